"""Several workers behind one executor: model-affinity routing, retry on a lost worker, workers joining.

A worker is anything with the executor's job and model methods (`run`, `interrupt`, `skip`,
`load_model`, `unload_model`, `loaded_model`, `close`): a `LocalExecutor` on one device, or a
Ray actor's handle. The job manager keeps the queue fair; it asks `reserve` which of the next
few fair jobs should run now, and the pool answers by model affinity:

1. the first of those jobs whose checkpoint an idle worker already holds goes to that worker;
2. else the first job goes to the idle worker whose swap is cheapest, by the bytes it must load,
   unless a busy worker holding its model will be free sooner than a load would take (running
   means of job and load times): then the job waits for that worker.

A worker that dies mid-job (`WorkerLost`) is dropped and the job runs once more on another
worker with the same seed; a second loss ends the job with a clear error.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modules.errors import AtelierError
from modules.jobs.model import JobResult, JobSpec
from modules.sampling.rng import resolve_seed

log = logging.getLogger(__name__)
IDLE, RESERVED, BUSY, LOST = "idle", "reserved", "busy", "lost"
RETRY_NOTICE = "retrying on another worker"


class WorkerLost(AtelierError):
    """A worker died while running a job (its process, actor or node is gone)."""


@dataclass
class _Slot:
    name: str
    worker: Any
    state: str = IDLE
    job_id: str | None = None
    model: str | None = None  # what the worker holds, as far as the pool knows
    loads: int = 0
    used: float = 0.0
    started: float = 0.0


def fix_seeds(spec: JobSpec) -> JobSpec:
    """The spec with random seeds (-1) drawn now, so that a retry on another worker repeats the job."""
    inner = spec.params.get("params") or {}
    changes = {k: resolve_seed(inner[k]) for k in ("seed", "subseed") if inner.get(k, 0) in (-1, None)
               and k in inner}
    if not changes:
        return spec
    params = copy.deepcopy(spec.params)
    params["params"].update(changes)
    return dataclasses.replace(spec, params=params)


class PoolExecutor:
    """Runs each job on one of several workers; `slots` is the number of live workers."""

    def __init__(self, workers: dict[str, Any], swap_bytes: Callable[[str], int] | None = None,
                 retries: int = 1, retry_wait: float = 300.0) -> None:
        self._slots = [_Slot(name, worker) for name, worker in workers.items()]
        self._swap_bytes = swap_bytes or (lambda _name: 1)
        self.retries = retries
        self.retry_wait = retry_wait
        self._lock = threading.Condition()
        self._listener: Callable[[], None] | None = None
        self._closed = False
        self._job_s: float | None = None  # running means: a job without a load, and the extra for a load
        self._load_s: float | None = None

    # -- capacity -----------------------------------------------------------------
    @property
    def slots(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots if s.state != LOST)

    def set_listener(self, listener: Callable[[], None]) -> None:
        """Called (without the pool's lock) whenever a worker becomes idle, joins or is lost."""
        self._listener = listener

    def _changed(self) -> None:
        if self._listener is not None:
            self._listener()

    def add_worker(self, name: str, worker: Any) -> None:
        """A worker that joins later: it takes jobs from the next dispatch on."""
        with self._lock:
            if any(s.name == name and s.state != LOST for s in self._slots):
                raise AtelierError(f"A worker named {name} is already in the pool.")
            self._slots.append(_Slot(name, worker))
            self._lock.notify_all()
        log.info("worker %s joined", name)
        self._changed()

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": s.name, "state": s.state, "model": s.model, "job": s.job_id, "loads": s.loads}
                    for s in self._slots]

    # -- routing -------------------------------------------------------------------
    def _cost(self, slot: _Slot, checkpoint: str | None) -> int:
        return 0 if checkpoint is None or slot.model == checkpoint else self._swap_bytes(checkpoint)

    def reserve(self, queued: list[tuple[str, str | None]]) -> int | None:
        """Which of the next fair jobs (id, checkpoint) runs now, with an idle worker reserved for it;
        None while no worker is idle, or while waiting for a busy holder beats loading a model.
        Only the first few jobs are candidates (fairness stays close to the queue's order)."""
        with self._lock:
            idle = [s for s in self._slots if s.state == IDLE]
            window = queued[:max(4, 2 * len(self._slots))]
            if not idle or not window:
                return None
            for index, (job_id, checkpoint) in enumerate(window):
                holder = next((s for s in idle if checkpoint is not None and s.model == checkpoint), None)
                if holder is not None:
                    self._take(holder, job_id, RESERVED)
                    return index
            wanted = {c for _, c in window}
            for index, (job_id, checkpoint) in enumerate(window):
                if self._better_to_wait(checkpoint, queued):
                    continue
                best = min(idle, key=lambda s: (self._cost(s, checkpoint), s.model in wanted, s.used))
                self._take(best, job_id, RESERVED)
                return index
            return None

    def _better_to_wait(self, checkpoint: str | None, queued: list[tuple[str, str | None]]) -> bool:
        """True when the busy workers holding `checkpoint` will likely get through every queued job
        that needs it sooner than an idle worker could load it."""
        busy = [s for s in self._slots if s.state in (BUSY, RESERVED) and s.model == checkpoint]
        if not busy or checkpoint is None or self._job_s is None or self._load_s is None:
            return False
        now = time.monotonic()
        remaining = min(max(0.0, self._job_s - (now - s.started)) for s in busy)
        needing = sum(1 for _, c in queued if c == checkpoint)
        return remaining + (needing - 1) * self._job_s / len(busy) < self._load_s

    def _learn(self, seconds: float, loaded: bool) -> None:
        """Running means of a job's time and a load's extra time (for `_better_to_wait`)."""
        with self._lock:
            if not loaded:
                self._job_s = seconds if self._job_s is None else 0.7 * self._job_s + 0.3 * seconds
            else:
                extra = max(0.0, seconds - (self._job_s or 0.0))
                self._load_s = extra if self._load_s is None else 0.7 * self._load_s + 0.3 * extra

    def _take(self, slot: _Slot, job_id: str, state: str) -> None:
        slot.state, slot.job_id = state, job_id

    def _slot_for(self, job_id: str, checkpoint: str | None, exclude: tuple[str, ...] = (),
                  wait: float = 0.0) -> _Slot:
        """The slot reserved for `job_id`, else the cheapest idle one (waiting up to `wait` seconds)."""
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                mine = next((s for s in self._slots if s.job_id == job_id and s.state == RESERVED), None)
                idle = [s for s in self._slots if s.state == IDLE and s.name not in exclude]
                slot = mine or (min(idle, key=lambda s: (self._cost(s, checkpoint), s.used)) if idle else None)
                if slot is not None:
                    self._take(slot, job_id, BUSY)
                    slot.started = time.monotonic()
                    return slot
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise AtelierError("No worker is free to run this job: every worker was lost. "
                                       "Start a worker (or restart the server) and submit it again.")
                self._lock.wait(remaining)

    def _release(self, slot: _Slot, model: str | None) -> None:
        with self._lock:
            if slot.state != LOST:
                slot.state, slot.job_id, slot.used = IDLE, None, time.monotonic()
                if model is not None:
                    slot.model = model
            self._lock.notify_all()
        self._changed()

    def _lose(self, slot: _Slot, err: Exception) -> None:
        with self._lock:
            slot.state, slot.job_id = LOST, None
            self._lock.notify_all()
        log.warning("worker %s was lost: %s", slot.name, err)
        self._changed()

    # -- jobs ------------------------------------------------------------------------
    def run(self, spec: JobSpec, on_event: Callable[[dict[str, Any]], None]) -> JobResult:
        spec = fix_seeds(spec)
        checkpoint = spec.params.get("checkpoint")
        slot = self._slot_for(spec.id, checkpoint, wait=self.retry_wait)
        tried: list[str] = []
        message = None
        while True:
            on_event({"worker": slot.name, "message": message})
            loading = slot.model != checkpoint and checkpoint is not None
            slot.loads += loading
            try:
                result = slot.worker.run(spec, on_event)
                self._learn(time.monotonic() - slot.started, loading)
            except WorkerLost as err:
                self._lose(slot, err)
                tried.append(slot.name)
                if len(tried) > self.retries:
                    raise AtelierError(f"The job failed: worker{'s' if len(tried) > 1 else ''} "
                                       f"{', '.join(tried)} died while running it ({err}).") from None
                message = f"Worker {slot.name} was lost; {RETRY_NOTICE}."
                log.warning("job %s: %s", spec.id, message)
                slot = self._slot_for(spec.id, checkpoint, exclude=tuple(tried), wait=self.retry_wait)
                continue
            except BaseException:
                self._release(slot, None)
                raise
            self._release(slot, result.model)
            if tried:
                result = dataclasses.replace(result, warnings=[*result.warnings, message])
            return result

    def _find(self, job_id: str) -> _Slot | None:
        with self._lock:
            return next((s for s in self._slots if s.job_id == job_id and s.state == BUSY), None)

    def interrupt(self, job_id: str) -> None:
        slot = self._find(job_id)
        if slot is not None:
            slot.worker.interrupt(job_id)

    def skip(self, job_id: str) -> None:
        slot = self._find(job_id)
        if slot is not None:
            slot.worker.skip(job_id)

    # -- models: the A1111 model routes act on every live worker ---------------------------
    def _live(self) -> list[_Slot]:
        with self._lock:
            return [s for s in self._slots if s.state != LOST]

    def load_model(self, name: str, components: Mapping[str, Any] | None = None) -> str:
        """Load `name` (with the VAE / text encoder choice `components`) on every idle worker (held meanwhile, so no job lands there mid-load); busy
        workers load it when a job asks for it."""
        loaded = name
        for slot in self._live():
            with self._lock:
                if slot.state != IDLE:
                    continue
                slot.state = BUSY
            try:
                loaded = slot.worker.load_model(name, components)
                slot.model = loaded
            except WorkerLost as err:
                self._lose(slot, err)
                continue
            finally:
                self._release(slot, None)
        return loaded

    def unload_model(self) -> None:
        for slot in self._live():
            slot.worker.unload_model()
            slot.model = None

    def loaded_model(self) -> str | None:
        return next((s.model for s in self._live() if s.model), None)

    def set_memory_policy(self, policy) -> None:
        for slot in self._live():
            setter = getattr(slot.worker, "set_memory_policy", None)
            if setter is not None:
                setter(policy)

    def memory_report(self) -> dict[str, Any]:
        """The first worker's policy report, with every worker's under `workers`."""
        reports = {s.name: s.worker.memory_report() for s in self._live() if hasattr(s.worker, "memory_report")}
        first = next(iter(reports.values()), {})
        return {**first, "workers": reports}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for slot in self._live():
            try:
                slot.worker.close()
            except Exception:  # one worker failing to close must not keep the others open
                log.exception("closing worker %s failed", slot.name)
