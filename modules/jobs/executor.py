"""The executor seam: the job manager hands plain job data to an executor and gets plain results back.

`LocalExecutor` is one worker thread that owns the engine and the device. A distributed
executor (Ray actors, several GPUs) implements the same `Executor` protocol: it gets a
`JobSpec` and returns a `JobResult`, and needs no shared in-process objects.
"""
from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from modules.checkpoints.components import ComponentChoice
from modules.errors import CheckpointError
from modules.jobs import runners
from modules.jobs.model import JobResult, JobSpec
from modules.jobs.payload import JobPayload

log = logging.getLogger(__name__)

# A progress event: {"fraction", "job_no", "job_count", "step", "steps", "preview": PNG bytes or None}.
EventCallback = Callable[[dict[str, Any]], None]


class Executor(Protocol):
    """Runs jobs. `run` blocks until the job ends and raises `AtelierError` for a failed job."""

    slots: int  # how many jobs it runs at once; the manager keeps that many dispatchers busy

    def run(self, spec: JobSpec, on_event: EventCallback) -> JobResult: ...

    def interrupt(self, job_id: str) -> None: ...

    def skip(self, job_id: str) -> None: ...

    def load_model(self, name: str, components: Mapping[str, Any] | None = None) -> str: ...

    def unload_model(self) -> None: ...

    def loaded_model(self) -> str | None: ...

    def close(self) -> None: ...


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class LocalExecutor:
    """One worker thread owns the engine; every engine call runs on it, one at a time."""

    slots = 1

    def __init__(self, engine, job_images_dir: Path, outdir: Path | None = None, name: str = "local") -> None:
        self.engine = engine
        self.name = name
        self.job_images_dir = Path(job_images_dir)
        self.outdir = outdir  # where saved images go; None: the engine's outputs/<task>-images
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"atelier-worker-{name}")
        self._controls: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loaded: str | None = None
        self._weights: str | None = None  # the running job's weights mode (fp8_storage); None: --weights
        self._loaded_weights: str | None = None
        self._choice = engine.default_choice() if hasattr(engine, "default_choice") else ComponentChoice()
        self.loads = 0  # checkpoints loaded so far (model-affinity routing keeps this low)

    # -- jobs -----------------------------------------------------------------
    def run(self, spec: JobSpec, on_event: EventCallback) -> JobResult:
        from modules.pipeline.control import JobControl

        control = JobControl()
        with self._lock:
            self._controls[spec.id] = control
        on_event({"worker": self.name})
        try:
            return self._worker.submit(self._execute, spec, control, on_event).result()
        finally:
            with self._lock:
                self._controls.pop(spec.id, None)

    def interrupt(self, job_id: str) -> None:
        with self._lock:
            control = self._controls.get(job_id)
        if control is not None:
            control.interrupt()

    def skip(self, job_id: str) -> None:
        with self._lock:
            control = self._controls.get(job_id)
        if control is not None:
            control.skip()

    def _execute(self, spec: JobSpec, control, on_event: EventCallback) -> JobResult:
        payload = JobPayload.from_json(spec.params, kind=spec.kind)
        needs_model = getattr(type(payload.params), "needs_checkpoint", True)
        self._weights = payload.weights or None  # this job's fp8_storage choice, for script cells too
        model = self._ensure_model(payload.checkpoint, payload.components) if needs_model else ""
        result = runners.run(self.engine, payload, control, lambda p: on_event(_event(p)), self.outdir,
                             lambda name, components=None: self._ensure_model(name, components or payload.components))
        paths = [str(p) for p in result.paths]
        if not paths:  # not saved to the gallery: keep the job's images under the data folder
            paths = [str(p) for p in runners.save_job_images(result, self.job_images_dir / spec.id)]
        return JobResult(images=paths, infotexts=list(result.infotexts), seeds=list(result.seeds),
                         subseeds=list(result.subseeds), prompts=list(result.prompts),
                         negative_prompts=list(result.negative_prompts), interrupted=result.interrupted,
                         warnings=list(result.warnings), model=model)

    # -- models ---------------------------------------------------------------
    def _ensure_model(self, name: str | None, components: Mapping[str, Any] | None = None) -> str:
        """Runs on the worker: load `name` with the VAE / text encoder choice `components` (None: the
        worker's current choice) unless that is what is loaded; returns its name."""
        if not name:
            raise CheckpointError("No checkpoint is available. Put a model in models/Stable-diffusion "
                                  "or start with --ckpt FILE.")
        info = self.engine.find_checkpoint(name)
        choice = self._choice if components is None else ComponentChoice.from_options(components)
        current = self.engine.models.current
        weights = self._weights or self.engine.settings.weights
        if current is None or Path(current.info.path).resolve() != Path(info.path).resolve() \
                or choice != self._choice or weights != self._loaded_weights:
            log.info("loading checkpoint %s", info.name)
            self.engine.load_model(info.path, choice, weights=weights)
            self.loads += 1
        self._loaded, self._choice, self._loaded_weights = info.name, choice, weights
        return info.name

    def load_model(self, name: str, components: Mapping[str, Any] | None = None) -> str:
        return self._worker.submit(self._ensure_model, name, components).result()

    def unload_model(self) -> None:
        def unload() -> None:
            self.engine.models.unload()
            self._loaded = None

        self._worker.submit(unload).result()

    def loaded_model(self) -> str | None:
        return self._loaded

    def set_memory_policy(self, policy) -> None:
        """Re-place the loaded model under `policy` on the worker (after the job it may be running)."""
        self._worker.submit(self.engine.set_memory_policy, policy).result()

    def memory_report(self) -> dict[str, Any]:
        return self.engine.memory_report()

    def close(self) -> None:
        with self._lock:
            for control in self._controls.values():
                control.interrupt()
        self._worker.shutdown(wait=True, cancel_futures=True)


def _event(progress) -> dict[str, Any]:
    return {"fraction": progress.fraction, "job_no": progress.job_no, "job_count": progress.job_count,
            "step": progress.step, "steps": progress.steps, "text": getattr(progress, "text", ""),
            "preview": png_bytes(progress.preview) if progress.preview is not None else None}
