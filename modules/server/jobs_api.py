"""The native jobs API under /api/v1/jobs: submit, inspect, follow (SSE), cancel, fetch images."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from modules.jobs.model import Caller, Job, JobNotFound, is_job_id
from modules.jobs.payload import JobPayload
from modules.server import convert
from modules.server.context import ServerContext
from modules.server.schemas import Img2ImgRequest, JobCreated, JobRequest, Txt2ImgRequest


def job_view(ctx: ServerContext, job: Job) -> dict[str, Any]:
    """A job as clients see it: no server paths, image URLs instead."""
    data = job.to_dict(with_params=False)
    data["params"] = JobPayload.from_json(job.params, kind=job.kind).request
    data["position"] = ctx.jobs.position(job.id)
    data["eta"] = ctx.jobs.eta(job) if not job.is_finished else None
    data["notice"] = ctx.jobs.notice(job.id)  # e.g. "Worker cuda:1 was lost; retrying on another worker."
    if job.result:
        result = data["result"]
        result["images"] = [f"/api/v1/jobs/{job.id}/images/{n}" for n in range(len(job.result.images))]
        result["info"] = convert.a1111_info(job)
    return data


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


def _job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise JobNotFound(f"No job {job_id}.")
    return job_id


def jobs_router(ctx: ServerContext, get_caller) -> APIRouter:
    router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
    CallerDep = Depends(get_caller)

    @router.post("", response_model=JobCreated, status_code=201)
    async def submit(body: JobRequest, caller: Caller = CallerDep) -> dict[str, Any]:
        model = Txt2ImgRequest if body.kind == "txt2img" else Img2ImgRequest
        try:
            req = model.model_validate(body.params)
        except ValidationError as err:
            detail = [{"loc": ["body", "params", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                      for e in err.errors(include_url=False, include_context=False, include_input=False)]
            raise HTTPException(status_code=422, detail=detail) from None
        job = await run_in_threadpool(convert.submit, ctx, caller, body.kind, req, "jobs-api")
        return {"id": job.id, "position": ctx.jobs.position(job.id), "state": job.state}

    @router.get("")
    def list_jobs(owner: str = "me", state: str | None = None, limit: int = 50,
                  caller: Caller = CallerDep) -> dict[str, Any]:
        jobs = ctx.jobs.list(caller, owner=None if owner == "all" else owner, state=state,
                             limit=max(1, min(limit, 500)))
        return {"jobs": [job_view(ctx, job) for job in jobs]}

    @router.get("/{job_id}")
    def get_job(job_id: str, caller: Caller = CallerDep) -> dict[str, Any]:
        return job_view(ctx, ctx.jobs.get(_job_id(job_id), caller))

    @router.delete("/{job_id}")
    def cancel_job(job_id: str, caller: Caller = CallerDep) -> dict[str, Any]:
        return job_view(ctx, ctx.jobs.cancel(_job_id(job_id), caller))

    @router.get("/{job_id}/images/{n}")
    def job_image(job_id: str, n: int, caller: Caller = CallerDep) -> FileResponse:
        job = ctx.jobs.get(_job_id(job_id), caller)
        paths = job.result.images if job.result else []
        if not 0 <= n < len(paths):
            raise HTTPException(status_code=404, detail=f"Job {job_id} has no image {n}.")
        path = Path(paths[n]).resolve()  # a path the executor recorded, never one from the client
        roots = [ctx.app.settings.outputs_dir.resolve(), ctx.data_dir.resolve()]
        if not any(path.is_relative_to(root) for root in roots) or not path.is_file():
            raise HTTPException(status_code=404, detail="The image file is gone.")
        return FileResponse(path, media_type="image/png" if path.suffix == ".png" else None)

    @router.get("/{job_id}/events")
    async def job_events(job_id: str, request: Request, caller: Caller = CallerDep) -> StreamingResponse:
        hub = request.app.state.hub
        ctx.jobs.get(_job_id(job_id), caller)  # 404 before the stream starts

        async def body():
            async for item in hub.stream(job_id, caller):
                if item is None:
                    yield b": keepalive\n\n"
                    continue
                kind, job, data = item
                yield _sse(kind, _event_payload(ctx, kind, job, data))

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def _event_payload(ctx: ServerContext, kind: str, job: Job | None, data: dict[str, Any]) -> dict[str, Any]:
    if kind == "position":
        return {"position": data["position"]}
    if kind == "progress":
        payload = {"id": job.id, "state": job.state, **job.progress.to_dict()}
        preview = data.get("preview")
        if preview:
            payload["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode("ascii")
        return payload
    view = job_view(ctx, job)
    if kind == "state":
        view["position"] = data.get("position")
    return view
