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
        self._closed = False

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> list[Job]:
        """Recover after a crash (running -> failed), requeue queued jobs, start dispatching."""
        failed = self.store.recover(time.time())
        for job in failed:
            log.warning("job %s was running when the server stopped; marked failed", job.id)
        with self._cond:
            for job in self.store.queued():
                self._live[job.id] = job
                self._queue.push(job.owner, job.id)
        for n in range(max(1, self.executor.slots)):
            thread = threading.Thread(target=self._dispatch_loop, name=f"atelier-dispatch-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return failed

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            running = [job.id for job in self._live.values() if job.state == RUNNING]
            self._cond.notify_all()
        for job_id in running:
            self.executor.interrupt(job_id)
        for thread in self._threads:
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
        self.store.update(job)
        self._cond.notify_all()
        return job

    def _next(self) -> Job | None:
        with self._cond:
            while not self._closed and not len(self._queue):
                self._cond.wait()
            if self._closed:
                return None
            job = self._live[self._queue.pop()].evolve(state=RUNNING, started=time.time())
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
        except InvalidParams as err:  # refused at run time (an extension's check, a model mismatch)
            return {"state": FAILED, "error": str(err), "error_kind": "invalid"}
        except AtelierError as err:
            return {"state": FAILED, "error": str(err)}
        except Exception as err:  # nothing a job does may take the worker down
            log.exception("job %s failed", job.id)
            return {"state": FAILED, "error": f"Internal error: {type(err).__name__}: {err}"}

    def _on_progress(self, job_id: str, event: dict[str, Any]) -> None:
        progress = Progress(**{k: event[k] for k in ("fraction", "job_no", "job_count", "step", "steps")})
        with self._cond:
            job = self._live.get(job_id)
            if job is None:
                return
            job = job.evolve(progress=progress)
            self._live[job_id] = job
            if event.get("preview") is not None:
                self._previews[job_id] = event["preview"]
        self._emit(JobEvent("progress", job, {"preview": event.get("preview")}))
