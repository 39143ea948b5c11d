"""The UI as a thin client of the job queue: build typed params by field name, submit, interrupt."""
from __future__ import annotations

from typing import Any

from modules.errors import AtelierError
from modules.jobs import payload
from modules.jobs.model import Caller, Job
from modules.jobs.submit import Submission
from modules.server.context import ServerContext


def params_class(kind: str) -> type:
    return payload.params_class("txt2img" if kind == "txt2img" else "img2img")


def submit(ctx: ServerContext, caller: Caller, kind: str, values: dict[str, Any],
           images: dict[str, Any] | None = None, checkpoint: str | None = None,
           script: dict[str, Any] | None = None) -> Job:
    """Queue a job for `caller` from widget values by field name; raises AtelierError with a readable message.

    `script` is the chosen script and its arguments by option name ({"name", "args"}), or None."""
    job_kind = "txt2img" if kind == "txt2img" else "img2img"
    submission = Submission(job_kind, {**values, "save_images": True}, images or {},
                            checkpoint=checkpoint or None, source="ui", script=script)
    return ctx.submitter.submit(caller, submission)


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
