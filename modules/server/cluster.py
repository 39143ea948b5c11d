"""Jobs on Ray workers (`--cluster`, `pip install .[cluster]`): one actor per GPU, or CPU actors.

Each actor builds its own App (engine, model cache, extensions from the same extensions/
folder) and keeps its models loaded between jobs. The head sends a plain `JobSpec` as a dict
and gets back plain data: progress events (previews as PNG bytes) streamed from a generator,
then the result with every image as bytes, written under the head's data folder. No Python
object is shared between the web server and a worker. Routing, retries and joining workers
are the `PoolExecutor`'s (modules/jobs/pool.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any

from modules.app import App
from modules.errors import AtelierError
from modules.jobs.model import JobResult, JobSpec
from modules.jobs.pool import PoolExecutor, WorkerLost
from modules.server.executors import checkpoint_bytes, worker_names
from modules.settings import Settings

log = logging.getLogger(__name__)
EXTRA_HINT = "--cluster needs Ray: install the extra with  pip install .[cluster]  (PyPI package ray)"
OBJECT_STORE_BYTES = 128 << 20  # a local head's object store: images are small (a 1024x1024 PNG is ~1.5 MB)


def extension_set(app: App) -> dict[str, str]:
    """The extensions an App loaded, name -> version: head and workers must agree."""
    return {e.name: e.version for e in app.plugins.extensions if e.status == "loaded"}


class AtelierWorker:
    """The Ray actor's body (wrapped by `ray.remote` at run time): an App and a LocalExecutor."""

    def __init__(self, settings: Settings, name: str, threads: int = 0) -> None:
        from modules.app import build_app
        from modules.jobs.executor import LocalExecutor

        if threads:
            import torch

            torch.set_num_threads(threads)
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s worker {name} %(name)s: %(message)s")
        self.name = name
        self.app = build_app(settings)
        self.images = settings.data_dir / "worker-images" / name
        self.executor = LocalExecutor(self.app.engine, self.images, name=name)

    def hello(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "extensions": extension_set(self.app), "loads": self.executor.loads,
                "device": str(self.app.engine.devices.device)}

    def run(self, spec: dict[str, Any], inputs: dict[str, bytes] | None = None):
        """A generator: {"event": ...} while the job runs, then {"result": ..., "files": [bytes]} or
        {"error": message}. `inputs`: the job's input images by the head's path, as bytes."""
        folder = self.images.parent / "inputs" / spec["id"]
        try:
            yield from self._run(_localised(spec, inputs or {}, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, spec: dict[str, Any]):
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                events.put(("result", self.executor.run(JobSpec(**spec), lambda e: events.put(("event", e)))))
            except Exception as err:  # sent back as data; the head raises it as an AtelierError
                events.put(("error", f"{err}" if isinstance(err, AtelierError) else f"{type(err).__name__}: {err}"))

        threading.Thread(target=work, daemon=True, name=f"atelier-job-{spec['id'][:8]}").start()
        while True:
            kind, item = events.get()
            if kind == "event":
                yield {"event": item}
            elif kind == "error":
                yield {"error": item}
                return
            else:
                yield {"result": item.to_dict(), "files": [self._take(Path(p)) for p in item.images]}
                return

    def _take(self, path: Path) -> dict[str, Any]:
        """An image file as bytes; the worker's own copy is removed (the head keeps the job's images)."""
        data = path.read_bytes()
        outputs = self.app.settings.outputs_dir.resolve()
        relative = path.resolve().relative_to(outputs).as_posix() if path.resolve().is_relative_to(outputs) else None
        if relative is None:
            path.unlink(missing_ok=True)
        return {"name": path.name, "outputs": relative, "data": data}

    def interrupt(self, job_id: str) -> None:
        self.executor.interrupt(job_id)

    def skip(self, job_id: str) -> None:
        self.executor.skip(job_id)

    def load_model(self, name: str, components: dict | None = None) -> str:
        return self.executor.load_model(name, components)

    def unload_model(self) -> None:
        self.executor.unload_model()

    def loaded_model(self) -> str | None:
        return self.executor.loaded_model()


def input_paths(inputs: dict[str, Any]) -> list[str]:
    """Every stored input image path of a payload's `inputs` (init_images: a list, mask: one path)."""
    return [p for value in inputs.values() for p in (value if isinstance(value, list) else [value])
            if isinstance(p, str)]


def _localised(spec: dict[str, Any], files: dict[str, bytes], folder: Path) -> dict[str, Any]:
    """The spec with its input images written on this worker, their paths rewritten to the copies."""
    inputs = (spec.get("params") or {}).get("inputs") or {}
    if not inputs or not files:
        return spec
    folder.mkdir(parents=True, exist_ok=True)
    moved = {}
    for n, path in enumerate(input_paths(inputs)):
        local = folder / f"{n}-{Path(path).name}"
        local.write_bytes(files[path])
        moved[path] = str(local)
    local_inputs = {k: [moved[p] for p in v] if isinstance(v, list) else moved.get(v, v) for k, v in inputs.items()}
    return {**spec, "params": {**spec["params"], "inputs": local_inputs}}


class RayWorker:
    """The head's handle on one actor: the pool's worker protocol, over Ray calls of plain data."""

    def __init__(self, ray, actor, name: str, settings: Settings, info: dict[str, Any]) -> None:
        self.ray, self.actor, self.name, self.info = ray, actor, name, info
        self.job_images = settings.data_dir / "job-images"
        self.outputs = settings.outputs_dir

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        ex = self.ray.exceptions
        names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                 "NodeDiedError", "OwnerDiedError", "ObjectLostError")
        return tuple(getattr(ex, n) for n in names if hasattr(ex, n))

    def run(self, spec: JobSpec, on_event) -> JobResult:
        files = {p: Path(p).read_bytes() for p in input_paths(spec.params.get("inputs") or {})}
        try:
            stream = self.actor.run.options(num_returns="streaming").remote(dataclasses.asdict(spec), files)
            for ref in stream:
                item = self.ray.get(ref)
                if "event" in item:
                    on_event(item["event"])
                elif "error" in item:
                    raise AtelierError(item["error"])
                else:
                    return self._result(spec.id, item)
        except self._lost_errors() as err:
            raise WorkerLost(f"{self.name}: {type(err).__name__}") from None
        raise WorkerLost(f"{self.name}: the job's stream ended without a result")

    def _result(self, job_id: str, item: dict[str, Any]) -> JobResult:
        paths = []
        for n, file in enumerate(item["files"]):
            if file["outputs"]:
                path = self.outputs / file["outputs"]
            else:
                path = self.job_images / job_id / f"{n:05d}-{Path(file['name']).name}"
            if not path.exists() or path.read_bytes() != file["data"]:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".part")
                partial.write_bytes(file["data"])
                partial.replace(path)
            paths.append(str(path))
        return dataclasses.replace(JobResult.from_dict(item["result"]), images=paths)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return self.ray.get(getattr(self.actor, method).remote(*args))
        except self._lost_errors() as err:
            raise WorkerLost(f"{self.name}: {type(err).__name__}") from None

    def interrupt(self, job_id: str) -> None:
        self.actor.interrupt.remote(job_id)

    def skip(self, job_id: str) -> None:
        self.actor.skip.remote(job_id)

    def load_model(self, name: str, components: dict | None = None) -> str:
        return self._call("load_model", name, components)

    def unload_model(self) -> None:
        self._call("unload_model")

    def loaded_model(self) -> str | None:
        return self._call("loaded_model")

    def hello(self) -> dict[str, Any]:
        return self._call("hello")

    def close(self) -> None:
        try:
            self.ray.kill(self.actor)
        except Exception:  # already gone
            log.debug("worker %s was already gone", self.name)


class RayExecutor(PoolExecutor):
    """A pool of Ray actors; `add_cpu_worker` / `add_gpu_worker` start more (they pick up work at once)."""

    def __init__(self, ray, app: App, owns_ray: bool) -> None:
        super().__init__({}, checkpoint_bytes(app))
        self.ray, self.app, self.owns_ray = ray, app, owns_ray
        self.expected = extension_set(app)
        self._count = 0
        self._stop = threading.Event()

    def start_worker(self, gpu: bool, settings: Settings | None = None, name: str | None = None) -> RayWorker | None:
        """Start one actor and admit it, unless its extension set differs from the head's (then None)."""
        self._count += 1
        name = name or f"ray-{'gpu' if gpu else 'cpu'}-{self._count}"
        settings = dataclasses.replace(settings or self.app.settings, device="cuda" if gpu else "cpu")
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        remote = self.ray.remote(**options, max_concurrency=4)(AtelierWorker)
        actor = remote.options(name=None).remote(settings, name, 0 if gpu else 1)
        worker = RayWorker(self.ray, actor, name, self.app.settings, {})
        worker.info = worker.hello()
        if worker.info["extensions"] != self.expected:
            log.error("worker %s refused: its extensions %s differ from the head's %s; install the same "
                      "extensions/ folder on every machine", name, _describe(worker.info["extensions"]),
                      _describe(self.expected))
            worker.close()
            return None
        self.add_worker(name, worker)
        return worker

    def watch_gpus(self, every: float = 15.0) -> None:
        """Start a GPU actor for each GPU that joins the cluster later (a node added with `ray start`)."""
        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    gpus = int(self.ray.cluster_resources().get("GPU", 0))
                    live = sum(1 for s in self._live() if s.name.startswith("ray-gpu"))
                    for _ in range(max(0, gpus - live)):
                        self.start_worker(True)
                except Exception:  # the head keeps serving while the cluster changes
                    log.exception("watching the Ray cluster for new GPUs failed")

        threading.Thread(target=loop, name="atelier-ray-watch", daemon=True).start()

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """Each live worker's own report: pid, device, extensions and how many checkpoints it loaded."""
        return {s.name: s.worker.hello() for s in self._live()}

    def close(self) -> None:
        self._stop.set()
        super().close()
        if self.owns_ray:
            self.ray.shutdown()


def _describe(extensions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}".strip() for k, v in sorted(extensions.items())) or "(none)"


def connect(ray, cluster: str) -> bool:
    """Start (`local`) or join (`auto`, ray://HOST:PORT) a Ray cluster; True when this process started it."""
    if ray.is_initialized():
        return False
    if cluster == "local":
        ray.init(num_cpus=int(os.environ.get("ATELIER_RAY_CPUS", os.cpu_count() or 1)),
                 include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        return True
    if cluster == "auto" or cluster.startswith("ray://"):
        ray.init(address=cluster, log_to_driver=False, configure_logging=False)
        return True
    raise AtelierError(f"--cluster {cluster!r}: use local, auto or ray://HOST:PORT")


def ray_executor(app: App, cluster: str, devices: tuple[str, ...] = ()) -> RayExecutor:
    """--cluster: one actor per GPU in the cluster (or one CPU actor), or as many CPU actors as
    --devices lists 'cpu' (cpu,cpu: two)."""
    try:
        import ray
    except ImportError:
        raise AtelierError(EXTRA_HINT) from None
    owns = connect(ray, cluster)
    executor = RayExecutor(ray, app, owns)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpu_workers = sum(1 for d in devices if d == "cpu")
    plan = [False] * cpu_workers if cpu_workers else ([True] * gpus or [False])
    for gpu, name in zip(plan, worker_names(tuple("ray-gpu" if g else "ray-cpu" for g in plan)), strict=True):
        executor.start_worker(gpu, name=name)
    if not executor.slots:
        executor.close()
        raise AtelierError("No Ray worker could be admitted (see the log lines above).")
    log.info("Ray cluster %s: %d workers", cluster, executor.slots)
    if not cpu_workers:
        executor.watch_gpus()
    return executor
