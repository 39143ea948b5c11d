"""Follow one of the caller's jobs for the UI: progress, queue position, previews and ETA, from job events.

Nothing here polls: `follow` subscribes to the job on the server's `EventHub`, reads the job once
(after subscribing, so no event is missed) and then waits for events; each batch of events that
arrives together becomes one `Update`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from modules.jobs.model import QUEUED, Caller, Job
from modules.server.context import ServerContext
from modules.server.events import EventHub, Item


@dataclass(frozen=True)
class Update:
    """One look at a followed job: the job, its queue position, a new preview (PNG bytes) or None."""

    job: Job
    position: int | None
    preview: bytes | None
    eta: float | None


class PreviewGate:
    """Passes a preview on once the step reaches the next multiple of N (0: no previews at all)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._latest: bytes | None = None
        self._shown: bytes | None = None
        self._shown_mark: tuple[int, int] | None = None

    def offer(self, job: Job, preview: bytes | None) -> bytes | None:
        """Note a progress event; returns the preview to show now, or None."""
        if preview is not None:
            self._latest = preview
        if self.every <= 0 or job.is_finished or self._latest is None or self._latest is self._shown:
            return None
        mark = (job.progress.job_no, job.progress.step // self.every)
        if mark == self._shown_mark:
            return None
        self._shown, self._shown_mark = self._latest, mark
        return self._latest


async def follow(ctx: ServerContext, hub: EventHub, caller: Caller, job_id: str,
                 preview_every: int = 1) -> AsyncIterator[Update]:
    """Updates for one of `caller`'s jobs until it finishes: one now, then one per batch of job events.

    Raises JobNotFound (before anything is yielded) when the job is not the caller's.
    """
    gate = PreviewGate(preview_every)
    with hub.subscribe(job_id) as events:
        job = ctx.jobs.get(job_id, caller)  # after subscribing: no event is missed
        position = ctx.jobs.position(job_id)
        preview = gate.offer(job, ctx.jobs.preview(job_id))
        while True:
            ahead = await jobs_ahead(ctx, position if job.state == QUEUED else None)
            yield Update(job, ahead, preview, _eta(job))
            if job.is_finished:
                return
            job, position, preview = _apply(await events.batch(), job, position, gate)


def _apply(items: list[Item], job: Job, position: int | None,
           gate: PreviewGate) -> tuple[Job, int | None, bytes | None]:
    """Fold a batch of events into (job, queue position, preview to show)."""
    preview = None
    for kind, event_job, data in items:
        if kind == "position":
            position = data.get("position")
            continue
        if event_job is not None:
            job = event_job
        if kind == "progress":
            preview = gate.offer(job, data.get("preview")) or preview
    return job, position, None if job.is_finished else preview


async def jobs_ahead(ctx: ServerContext, position: int | None) -> int | None:
    """How many jobs run before a queued one at `position`: the position plus the jobs running now."""
    if position is None:
        return None
    running = await asyncio.to_thread(ctx.jobs.list, Caller("ui", admin=True), owner=None, state="running",
                                      limit=100)
    return position + len(running)


def _eta(job: Job) -> float | None:
    fraction = job.progress.fraction
    if job.started is None or fraction <= 0:
        return None
    elapsed = time.time() - job.started
    return max(elapsed / fraction - elapsed, 0.0)
