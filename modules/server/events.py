"""Bridge from the job manager's threads to asyncio: per-job event queues for SSE and waiting."""
from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

from modules.jobs.manager import JobEvent, JobManager
from modules.jobs.model import FINISHED, Caller, Job


class EventHub:
    """Subscribers get (type, job, data) tuples for one job; positions arrive as ("position", None, {...})."""

    def __init__(self, jobs: JobManager, loop: asyncio.AbstractEventLoop) -> None:
        self.jobs = jobs
        self.loop = loop
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)

    def attach(self) -> None:
        self.jobs.add_listener(self._on_event)

    def detach(self) -> None:
        self.jobs.remove_listener(self._on_event)

    def _on_event(self, event: JobEvent) -> None:  # called on manager threads
        self.loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: JobEvent) -> None:
        if event.type == "positions":
            for job_id, position in event.data["positions"].items():
                for queue in self._subscribers.get(job_id, ()):
                    queue.put_nowait(("position", None, {"position": position}))
        elif event.job is not None:
            for queue in self._subscribers.get(event.job.id, ()):
                queue.put_nowait((event.type, event.job, event.data))

    @contextlib.contextmanager
    def subscribe(self, job_id: str):
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[job_id].discard(queue)
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]

    async def stream(self, job_id: str, caller: Caller, keepalive: float = 15.0) -> AsyncIterator[tuple]:
        """The job's current state, then its events until it finishes; None items are keepalives."""
        with self.subscribe(job_id) as queue:
            job = self.jobs.get(job_id, caller)  # after subscribing: no event is missed
            yield ("state", job, {"position": self.jobs.position(job_id)})
            while not job.is_finished:
                try:
                    kind, event_job, data = await asyncio.wait_for(queue.get(), keepalive)
                except asyncio.TimeoutError:
                    yield None
                    continue
                job = event_job or job
                yield (kind, job, data)
                if kind in FINISHED:
                    return

    async def wait(self, job_id: str, caller: Caller) -> Job:
        async for item in self.stream(job_id, caller, keepalive=60.0):
            if item is not None and item[1] is not None and item[1].is_finished:
                return item[1]
        return self.jobs.get(job_id, caller)
