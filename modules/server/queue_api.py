"""The queue API under /api/v1/queue: see it (position, worker, ETA), pause and resume, reorder, prioritise.

Users steer only their own jobs; admins (everyone, without logins) steer every job and the whole queue.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from modules.jobs.model import Caller, JobNotFound, NotAllowed, NotQueued, is_job_id
from modules.server.context import ServerContext
from modules.server.queue_panel import PANEL_HTML


class PauseRequest(BaseModel):
    all: bool = Field(False, description="pause or resume everyone's jobs (admins only)")
    owner: str | None = Field(None, description="whose jobs (default: yours; another user's: admins only)")


class MoveRequest(BaseModel):
    index: int = Field(..., ge=0, description="the new place among your queued jobs (0: first)")


class PriorityRequest(BaseModel):
    priority: int = Field(..., ge=-1000, le=1000, description="higher runs first; 0 is normal")


def entry_view(entry: dict[str, Any]) -> dict[str, Any]:
    job = entry["job"]
    return {"id": job.id, "owner": job.owner, "kind": job.kind, "state": job.state,
            "position": entry["position"], "priority": entry["priority"], "paused": entry["paused"],
            "worker": job.worker, "eta": entry["eta"], "progress": job.progress.to_dict(),
            "created": job.created, "started": job.started}


def _steer(action):
    """Queue errors as HTTP: another user's job 404, not allowed 403, no longer queued 409."""
    try:
        return action()
    except NotAllowed as err:
        raise HTTPException(status_code=403, detail=str(err)) from None
    except NotQueued as err:
        raise HTTPException(status_code=409, detail=str(err)) from None


def queue_router(ctx: ServerContext, get_caller) -> APIRouter:
    router = APIRouter(prefix="/api/v1/queue", tags=["queue"])

    base = Depends(get_caller)

    def steering_caller(caller: Caller = base) -> Caller:
        return Caller(caller.owner, admin=ctx.is_admin(caller))

    CallerDep = Depends(steering_caller)

    def job_id_of(job_id: str) -> str:
        if not is_job_id(job_id):
            raise JobNotFound(f"No job {job_id}.")
        return job_id

    @router.get("")
    def queue(caller: Caller = CallerDep) -> dict[str, Any]:
        state = ctx.jobs.queue_state(caller)
        return {"paused": state["paused"], "paused_owners": state["paused_owners"],
                "workers": state["workers"], "jobs": [entry_view(e) for e in state["entries"]]}

    @router.get("/panel", response_class=HTMLResponse)
    def panel(caller: Caller = CallerDep) -> HTMLResponse:
        """The queue panel for a browser (same rights as the routes it calls)."""
        return HTMLResponse(PANEL_HTML, headers={"Cache-Control": "no-store"})

    def pause_target(body: PauseRequest, caller: Caller) -> str | None:
        return None if body.all else (body.owner or caller.owner)

    @router.post("/pause")
    def pause(body: PauseRequest, caller: Caller = CallerDep) -> dict[str, Any]:
        _steer(lambda: ctx.jobs.set_paused(caller, True, pause_target(body, caller)))
        return queue(caller)

    @router.post("/resume")
    def resume(body: PauseRequest, caller: Caller = CallerDep) -> dict[str, Any]:
        _steer(lambda: ctx.jobs.set_paused(caller, False, pause_target(body, caller)))
        return queue(caller)

    @router.post("/{job_id}/move")
    def move(job_id: str, body: MoveRequest, caller: Caller = CallerDep) -> dict[str, Any]:
        order = _steer(lambda: ctx.jobs.move(job_id_of(job_id), body.index, caller))
        return {"order": order}

    @router.post("/{job_id}/priority")
    def priority(job_id: str, body: PriorityRequest, caller: Caller = CallerDep) -> dict[str, Any]:
        _steer(lambda: ctx.jobs.set_priority(job_id_of(job_id), body.priority, caller))
        return {"id": job_id, "priority": body.priority, "position": ctx.jobs.position(job_id)}

    @router.delete("/{job_id}")
    def cancel(job_id: str, caller: Caller = CallerDep) -> dict[str, Any]:
        job = ctx.jobs.cancel(job_id_of(job_id), caller)
        return {"id": job.id, "state": job.state}

    return router
