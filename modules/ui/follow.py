"""Follow one of the caller's jobs for the UI: progress, queue position, previews and ETA."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from modules.jobs.model import Caller, Job
from modules.server.context import ServerContext


@dataclass(frozen=True)
class Update:
    """One look at a followed job: the job, its queue position, a new preview (PNG bytes) or None."""

    job: Job
    position: int | None
    preview: bytes | None
    eta: float | None


def follow(ctx: ServerContext, caller: Caller, job_id: str, preview_every: int = 1,
           interval: float = 0.25) -> Iterator[Update]:
    """Poll a job until it finishes; a preview is passed on when the step reaches the next multiple of N."""
    shown_step = -1
    last_preview: bytes | None = None
    while True:
        job = ctx.jobs.get(job_id, caller)
        preview = None
        if not job.is_finished and preview_every > 0:
            step_mark = (job.progress.job_no, job.progress.step // max(preview_every, 1))
            candidate = ctx.jobs.preview(job_id)
            if candidate is not None and candidate is not last_preview and step_mark != shown_step:
                preview, last_preview, shown_step = candidate, candidate, step_mark
        yield Update(job, jobs_ahead(ctx, job), preview, _eta(job))
        if job.is_finished:
            return
        time.sleep(interval)


def jobs_ahead(ctx: ServerContext, job: Job) -> int | None:
    """How many jobs run before this queued one: the queue position plus the jobs running now."""
    position = ctx.jobs.position(job.id)
    if position is None:
        return None
    running = ctx.jobs.list(Caller("ui", admin=True), owner=None, state="running", limit=100)
    return position + len(running)


def _eta(job: Job) -> float | None:
    fraction = job.progress.fraction
    if job.started is None or fraction <= 0:
        return None
    elapsed = time.time() - job.started
    return max(elapsed / fraction - elapsed, 0.0)
