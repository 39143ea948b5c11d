"""The job manager: submit, schedule fairly, run on an executor, record durably, cancel per owner."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modules.errors import AtelierError, InvalidParams
from modules.jobs.executor import Executor
from modules.jobs.model import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Caller,
    Job,
    JobNotFound,
    JobSpec,
    NotAllowed,
    NotQueued,
    Progress,
    QueueFull,
    new_job_id,
)
from modules.jobs.queue import FairQueue
from modules.jobs.store import JobStore

log = logging.getLogger(__name__)
SHUTDOWN_REASON = "The server shut down while this job was running; the images finished so far are kept."


@dataclass(frozen=True)
class JobEvent:
    """What listeners get. type: queued, running, progress, positions, done, failed or cancelled."""

    type: str
    job: Job | None = None
    data: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[JobEvent], None]


class JobManager:
    """Owns the fair queue and the history; dispatchers feed the executor one job per slot."""

    def __init__(self, store: JobStore, executor: Executor, max_queued_per_owner: int = 1000) -> None:
        self.store = store
        self.executor = executor
        self.max_queued_per_owner = max_queued_per_owner
        self._cond = threading.Condition()
        self._queue = FairQueue()
        self._live: dict[str, Job] = {}  # queued and running jobs
        self._previews: dict[str, bytes] = {}
        self._cancelling: set[str] = set()
        self._listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self._notices: dict[str, str] = {}  # job id -> the executor's last word ("retrying on another worker")
        self._durations: list[float] = []  # run times of recent jobs, for ETAs
        self._closed = False

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> list[Job]:
        """Recover after a crash (running -> failed), requeue queued jobs, start dispatching."""
        failed = self.store.recover(time.time())
        for job in failed:
            log.warning("job %s was running when the server stopped; marked failed", job.id)
        with self._cond:
            self._restore_queue()
            self._durations = self.store.durations()
        listen = getattr(self.executor, "set_listener", None)
        if listen is not None:  # a pool whose workers come and go wakes the dispatchers
            listen(self._executor_changed)
        self._ensure_dispatchers()
        return failed

    def _restore_queue(self) -> None:
        """Queued jobs back in the queue in their steered order, with priorities and pauses; lock held."""
        steered = self.store.queue_order()
        jobs = self.store.queued()
        jobs.sort(key=lambda j: (steered.get(j.id, (None, 0))[0] is None, steered.get(j.id, (0, 0))[0] or 0,
                                 j.seq))
        for job in jobs:
            self._live[job.id] = job
            self._queue.push(job.owner, job.id, steered.get(job.id, (None, 0))[1])
        self._queue.paused_all, self._queue.paused_owners = self.store.paused()

    def _ensure_dispatchers(self) -> None:
        """One dispatcher per executor slot (more when workers join)."""
        with self._cond:
            while len(self._threads) < max(1, self.executor.slots) and not self._closed:
                thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                          name=f"atelier-dispatch-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)

    def _executor_changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._ensure_dispatchers()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            running = [job.id for job in self._live.values() if job.state == RUNNING]
            self._cond.notify_all()
        for job_id in running:
            self.executor.interrupt(job_id)
        for thread in list(self._threads):
            thread.join(timeout)
        self.executor.close()

    # -- listeners ------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _emit(self, event: JobEvent) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must never stop the queue
                log.exception("job event listener failed")

    def _emit_positions(self) -> None:
        with self._cond:
            positions = self._queue.positions()
        self._emit(JobEvent("positions", data={"positions": positions}))

    # -- submitting and reading -------------------------------------------------------
    def submit(self, caller: Caller, kind: str, params: dict[str, Any]) -> Job:
        job = Job(id=new_job_id(), owner=caller.owner, kind=kind, params=params)
        with self._cond:
            if self._closed:
                raise AtelierError("The server is shutting down; no new jobs are accepted.")
            waiting = sum(1 for j in self._live.values() if j.owner == caller.owner and j.state == QUEUED)
            if waiting >= self.max_queued_per_owner:
                raise QueueFull(f"You already have {waiting} jobs waiting; wait for some to finish.")
            job = self.store.add(job)
            self._live[job.id] = job
            self._queue.push(job.owner, job.id)
            self._cond.notify_all()
        self._emit(JobEvent(QUEUED, job))
        self._emit_positions()
        return job

    def get(self, job_id: str, caller: Caller) -> Job:
        with self._cond:
            job = self._live.get(job_id)
        job = job or self.store.get(job_id)
        if job is None or not caller.may_touch(job):
            raise JobNotFound(f"No job {job_id}.")  # another owner's job is not even acknowledged
        return job

    def position(self, job_id: str) -> int | None:
        with self._cond:
            return self._queue.positions().get(job_id)

    def preview(self, job_id: str) -> bytes | None:
        with self._cond:
            return self._previews.get(job_id)

    def list(self, caller: Caller, owner: str | None = None, limit: int = 100,
             state: str | None = None) -> list[Job]:
        """The caller's jobs, newest first; admins may ask for anyone's (`owner` None: all)."""
        if not caller.admin or owner == "me":
            owner = caller.owner
        jobs = self.store.list(owner=owner, state=state, limit=limit)
        with self._cond:
            return [self._live.get(job.id, job) for job in jobs]

    def active(self, caller: Caller) -> list[Job]:
        """The caller's running jobs first, then their queued ones in queue order."""
        with self._cond:
            order = {job_id: n for n, job_id in enumerate(self._queue.order())}
            mine = [job for job in self._live.values() if job.owner == caller.owner]
        return sorted(mine, key=lambda j: (j.state != RUNNING, order.get(j.id, -1)))

    def queue_length(self) -> int:
        with self._cond:
            return len(self._live)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (for scripts and tests; the server waits on events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while job_id in self._live:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"job {job_id} still {self._live[job_id].state}")
                self._cond.wait(remaining)
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"No job {job_id}.")
        return job

    # -- control ----------------------------------------------------------------------
    def cancel(self, job_id: str, caller: Caller) -> Job:
        """A queued job is removed; a running one is interrupted and ends cancelled, keeping its images."""
        job = self.get(job_id, caller)
        with self._cond:
            live = self._live.get(job_id)
            if live is not None and live.state == QUEUED and self._queue.remove(job_id):
                job = self._finish(live.evolve(state=CANCELLED, finished=time.time(), error="Cancelled."))
                cancelled = True
            else:
                cancelled = False
                if live is not None:
                    self._cancelling.add(job_id)
        if cancelled:
            self._emit(JobEvent(CANCELLED, job))
            self._emit_positions()
        elif live is not None:
            self.executor.interrupt(job_id)
        return job

    def interrupt(self, job_id: str, caller: Caller) -> None:
        """Stop a running job at the next step; the images finished so far are kept."""
        job = self.get(job_id, caller)
        if job.state == RUNNING:
            self.executor.interrupt(job_id)

    def skip(self, job_id: str, caller: Caller) -> None:
        """Move a running job on to its next batch."""
        job = self.get(job_id, caller)
        if job.state == RUNNING:
            self.executor.skip(job_id)

    # -- dispatching ------------------------------------------------------------------------
    def _finish(self, job: Job) -> Job:
        """Record a finished job; caller holds the lock."""
        self._live.pop(job.id, None)
        self._previews.pop(job.id, None)
        self._cancelling.discard(job.id)
        self._notices.pop(job.id, None)
        if job.state == DONE and job.started is not None and job.finished is not None:
            self._durations = [job.finished - job.started, *self._durations[:19]]
        self.store.update(job)
        self._cond.notify_all()
        return job

    def _pick(self) -> str | None:
        """The next job to run, or None to wait; lock held. A pool executor may pick from a window of the
        next fair jobs (model affinity) and says None while no worker is idle."""
        order = self._queue.runnable()
        if not order:
            return None
        reserve = getattr(self.executor, "reserve", None)
        if reserve is None:
            return self._queue.pop()
        window = order[:64]  # the pool looks a few jobs ahead, and counts the rest by model
        index = reserve([(job_id, self._live[job_id].params.get("checkpoint")) for job_id in window])
        return None if index is None else self._queue.pop(window[index])

    def _next(self) -> Job | None:
        with self._cond:
            while not self._closed and (job_id := self._pick()) is None:
                self._cond.wait()
            if self._closed:
                return None
            job = self._live[job_id].evolve(state=RUNNING, started=time.time())
            self._live[job.id] = job
            self.store.update(job)
        self._emit(JobEvent(RUNNING, job))
        self._emit_positions()
        return job

    def _dispatch_loop(self) -> None:
        while (job := self._next()) is not None:
            changes = self._execute(job)
            with self._cond:
                if changes.get("state") == DONE and job.id in self._cancelling:
                    changes.update(state=CANCELLED, error="Cancelled while running.")
                elif changes.get("state") == DONE and self._closed and changes["result"].interrupted:
                    changes.update(state=FAILED, error=SHUTDOWN_REASON)
                final = self._finish(self._live[job.id].evolve(finished=time.time(), **changes))
            self._emit(JobEvent(final.state, final))

    def _execute(self, job: Job) -> dict[str, Any]:
        try:
            result = self.executor.run(JobSpec(job.id, job.kind, job.params),
                                       lambda event: self._on_progress(job.id, event))
            return {"state": DONE, "result": result}
        except AtelierError as err:  # InvalidParams: refused at run time (an extension's check, a model mismatch)
            log.warning("job %s failed: %s", job.id, " ".join(str(err).split()))  # one line
            kind = {"error_kind": "invalid"} if isinstance(err, InvalidParams) else {}
            return {"state": FAILED, "error": str(err), **kind}
        except Exception as err:  # nothing a job does may take the worker down
            log.exception("job %s failed", job.id)
            return {"state": FAILED, "error": f"Internal error: {type(err).__name__}: {err}"}

    def _on_progress(self, job_id: str, event: dict[str, Any]) -> None:
        if "worker" in event:  # the executor says which worker runs it (and why it moved)
            self._on_worker(job_id, event)
            return
        progress = Progress(**{k: event[k] for k in ("fraction", "job_no", "job_count", "step", "steps")},
                            text=str(event.get("text") or ""))
        with self._cond:
            job = self._live.get(job_id)
            if job is None:
                return
            job = job.evolve(progress=progress)
            self._live[job_id] = job
            if event.get("preview") is not None:
                self._previews[job_id] = event["preview"]
        self._emit(JobEvent("progress", job, {"preview": event.get("preview")}))

    def _on_worker(self, job_id: str, event: dict[str, Any]) -> None:
        with self._cond:
            job = self._live.get(job_id)
            if job is None:
                return
            job = self._live[job_id] = job.evolve(worker=event["worker"])
            if event.get("message"):
                self._notices[job_id] = event["message"]
        self._emit(JobEvent("progress", job, {"message": event.get("message")}))

    # -- steering the queue ------------------------------------------------------------------
    def notice(self, job_id: str) -> str | None:
        with self._cond:
            return self._notices.get(job_id)

    def set_paused(self, caller: Caller, paused: bool, owner: str | None = None) -> None:
        """Pause or resume everyone's jobs (`owner` None: admins only) or one owner's (their own, or admins)."""
        if not caller.admin and owner != caller.owner:
            raise NotAllowed("Only admins may pause or resume the whole queue or another user's jobs.")
        with self._cond:
            if owner is None:
                self._queue.paused_all = paused
            elif paused:
                self._queue.paused_owners.add(owner)
            else:
                self._queue.paused_owners.discard(owner)
            self.store.set_paused(owner, paused)
            self._cond.notify_all()
        self._emit_positions()

    def move(self, job_id: str, index: int, caller: Caller) -> list[str]:
        """Move a queued job to `index` among its owner's queued jobs; returns that owner's new order."""
        self.get(job_id, caller)  # another user's job is not found
        with self._cond:
            if job_id not in self._queue:
                raise NotQueued(f"Job {job_id} is not waiting in the queue any more.")
            lane = self._queue.move(job_id, index)
            self.store.set_ranks(lane)
        self._emit_positions()
        return lane

    def set_priority(self, job_id: str, priority: int, caller: Caller) -> None:
        """Admins only: a job with a higher priority runs before every job with a lower one."""
        if not caller.admin:
            raise NotAllowed("Only admins may set a job's priority.")
        self.get(job_id, caller)
        with self._cond:
            if job_id not in self._queue:
                raise NotQueued(f"Job {job_id} is not waiting in the queue any more.")
            self._queue.set_priority(job_id, priority)
            self.store.set_priority(job_id, priority)
            self._cond.notify_all()
        self._emit_positions()

    def eta(self, job: Job) -> float | None:
        """Seconds until `job` is likely done (running or queued); None when unknown or finished."""
        with self._cond:
            mean = sum(self._durations) / len(self._durations) if self._durations else None
            position = self._queue.positions().get(job.id)
        if job.state == RUNNING:
            return _running_eta(job, mean)
        if position is None or mean is None:
            return None
        return mean * (position // max(1, self.executor.slots) + 1)

    def queue_state(self, caller: Caller) -> dict[str, Any]:
        """The live queue as `caller` may see it: their jobs (admins: everyone's) in run order,
        with position, priority, worker and ETA in seconds (None until a job has finished)."""
        with self._cond:
            order = self._queue.order()
            running = [job for job in self._live.values() if job.state == RUNNING]
            queued = [self._live[job_id] for job_id in order]
            paused_all, paused = self._queue.paused_all, set(self._queue.paused_owners)
            priorities = {job_id: self._queue.priority(job_id) for job_id in order}
            mean = sum(self._durations) / len(self._durations) if self._durations else None
        slots = max(1, self.executor.slots)
        entries = []
        for job in running:
            entries.append({"job": job, "position": None, "priority": 0,
                            "eta": _running_eta(job, mean), "paused": False})
        for n, job in enumerate(queued):
            entries.append({"job": job, "position": n, "priority": priorities[job.id],
                            "eta": None if mean is None else mean * (n // slots + 1),
                            "paused": paused_all or job.owner in paused})
        visible = [e for e in entries if caller.may_touch(e["job"])]
        return {"paused": paused_all, "paused_owners": sorted(o for o in paused if caller.admin or o == caller.owner),
                "entries": visible, "workers": _workers(self.executor)}


def _running_eta(job: Job, mean: float | None) -> float | None:
    fraction = job.progress.fraction
    if job.started is not None and 0 < fraction < 1:
        elapsed = time.time() - job.started
        return elapsed * (1 - fraction) / fraction
    return mean


def _workers(executor: Executor) -> list[dict[str, Any]]:
    describe = getattr(executor, "workers", None)
    if describe is not None:
        return describe()
    return [{"name": "local", "model": executor.loaded_model(), "state": "ready"}]
