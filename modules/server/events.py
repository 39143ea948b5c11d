"""Bridge from the job manager's threads to asyncio: per-job event subscriptions for SSE, the UI and waiting.

The hub is one `JobManager` listener. Each subscription belongs to one job and to the event loop it
was opened on, so the jobs API, the A1111 API and the Gradio UI can all follow jobs without polling,
whichever loop they run on.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from modules.jobs.manager import JobEvent, JobManager
from modules.jobs.model import FINISHED, Caller, Job

# What a subscription yields: (type, job or None, data); positions arrive as ("position", None, {...}).
Item = tuple[str, "Job | None", dict]


@dataclass(eq=False)
class Subscription:
    """One subscriber's events for one job, queued on the subscriber's own event loop."""

    job_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Item) -> None:
        """Hand an item over from any thread."""
        with contextlib.suppress(RuntimeError):  # the subscriber's loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self, timeout: float | None = None) -> Item:
        """The next item; raises asyncio.TimeoutError after `timeout` seconds (None: wait for ever)."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def batch(self, timeout: float | None = None) -> list[Item]:
        """Wait for the next item, then take every item already waiting (oldest first)."""
        items = [await self.get(timeout)]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class EventHub:
    """Subscribers get (type, job, data) tuples for one job; positions arrive as ("position", None, {...})."""

    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = {}

    def attach(self) -> None:
        self.jobs.add_listener(self._on_event)

    def detach(self) -> None:
        self.jobs.remove_listener(self._on_event)

    def _on_event(self, event: JobEvent) -> None:  # called on manager threads
        if event.type == "positions":
            items = [(job_id, ("position", None, {"position": position}))
                     for job_id, position in event.data["positions"].items()]
        elif event.job is not None:
            items = [(event.job.id, (event.type, event.job, event.data))]
        else:
            return
        with self._lock:
            targets = [(sub, item) for job_id, item in items for sub in self._subscribers.get(job_id, ())]
        for sub, item in targets:
            sub.put(item)

    def subscriber_count(self, job_id: str | None = None) -> int:
        """How many subscriptions are open (for one job, or in all)."""
        with self._lock:
            if job_id is not None:
                return len(self._subscribers.get(job_id, ()))
            return sum(len(subs) for subs in self._subscribers.values())

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """Events for `job_id` from now on, on the running event loop, until the block ends."""
        sub = Subscription(job_id, asyncio.get_running_loop())
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(sub)
        try:
            yield sub
        finally:
            with self._lock:
                subs = self._subscribers.get(job_id)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subscribers[job_id]

    async def stream(self, job_id: str, caller: Caller, keepalive: float = 15.0) -> AsyncIterator[Item | None]:
        """The job's current state, then its events until it finishes; None items are keepalives."""
        with self.subscribe(job_id) as sub:
            job = self.jobs.get(job_id, caller)  # after subscribing: no event is missed
            yield ("state", job, {"position": self.jobs.position(job_id)})
            while not job.is_finished:
                try:
                    kind, event_job, data = await sub.get(keepalive)
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
