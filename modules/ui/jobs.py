"""The UI as a thin client of the job queue: build typed params by field name, submit, follow."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from modules.errors import AtelierError
from modules.jobs import payload
from modules.jobs.model import Caller, Job
from modules.jobs.submit import Submission
from modules.server.context import ServerContext


def params_class(kind: str) -> type:
    return payload.params_class("txt2img" if kind == "txt2img" else "img2img")


def submit(ctx: ServerContext, caller: Caller, kind: str, values: dict[str, Any],
           images: dict[str, Any] | None = None, checkpoint: str | None = None) -> Job:
    """Queue a job for `caller` from widget values by field name; raises AtelierError with a readable message."""
    job_kind = "txt2img" if kind == "txt2img" else "img2img"
    submission = Submission(job_kind, {**values, "save_images": True}, images or {},
                            checkpoint=checkpoint or None, source="ui")
    return ctx.submitter.submit(caller, submission)


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


def interrupt_mine(ctx: ServerContext, caller: Caller, skip: bool = False) -> int:
    """Interrupt (or skip) the caller's running jobs only; returns how many were reached."""
    from modules.server.sdapi import running_jobs

    jobs = [job for job in running_jobs(ctx, Caller(caller.owner)) if job.owner == caller.owner]
    for job in jobs:
        (ctx.jobs.skip if skip else ctx.jobs.interrupt)(job.id, caller)
    return len(jobs)


def readable(err: Exception) -> str:
    """A user-facing message for an error; never a stack trace."""
    if isinstance(err, AtelierError):
        return str(err)
    return f"Something went wrong: {type(err).__name__}: {err}"
