"""The A1111-compatible API under /sdapi/v1: thin client of the job manager."""
from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from modules import images as image_files
from modules import infotext
from modules.errors import AtelierError
from modules.jobs.model import FAILED, RUNNING, Caller, Job
from modules.jobs.overrides import COMPONENT_OPTIONS, PARAM_OPTIONS
from modules.jobs.payload import JobPayload
from modules.server import convert, scripts_api, system
from modules.server.context import ServerContext
from modules.server.extras_api import add_extras_routes
from modules.server.schemas import GenerationResponse, Img2ImgRequest, PngInfoRequest, Txt2ImgRequest

ADMIN_ONLY = ("Only admin users may change the server's models and options while logins are on: ask an admin, "
              "or start the server with --admin-users NAME[,NAME...].")


def sdapi_router(ctx: ServerContext, get_caller) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["A1111 compatible"])
    CallerDep = Depends(get_caller)

    def require_admin(caller: Caller = CallerDep) -> None:
        if not ctx.is_admin(caller):
            raise HTTPException(status_code=403, detail=ADMIN_ONLY)

    AdminDep = Depends(require_admin)

    async def generate(request: Request, caller: Caller, kind: str, req: Txt2ImgRequest):
        job = await run_in_threadpool(convert.submit, ctx, caller, kind, req)
        job = await request.app.state.hub.wait(job.id, caller)
        if job.state == FAILED:
            return JSONResponse(status_code=422 if job.error_kind == "invalid" else 500, content={
                "error": "JobFailed", "detail": job.error, "errors": job.error, "job_id": job.id})
        return await run_in_threadpool(convert.a1111_response, job, req.send_images)

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request, caller: Caller = CallerDep):
        return await generate(request, caller, "txt2img", req)

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(req: Img2ImgRequest, request: Request, caller: Caller = CallerDep):
        return await generate(request, caller, "img2img", req)

    @router.post("/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        image = convert.decode_image(req.image.strip(), ("image",), 1 << 30)
        text = image_files.read_infotext(image) or ""
        items = {k: v for k, v in image.info.items() if isinstance(v, str | int | float) and k != "parameters"}
        return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}

    @router.get("/progress")
    def progress(skip_current_image: bool = False, caller: Caller = CallerDep) -> dict[str, Any]:
        return progress_report(ctx, caller, skip_current_image)

    @router.post("/interrupt")
    def interrupt(caller: Caller = CallerDep) -> dict:
        for job in running_jobs(ctx, caller):
            ctx.jobs.interrupt(job.id, caller)
        return {}

    @router.post("/skip")
    def skip(caller: Caller = CallerDep) -> dict:
        for job in running_jobs(ctx, caller):
            ctx.jobs.skip(job.id, caller)
        return {}

    @router.get("/options")
    def get_options(caller: Caller = CallerDep) -> dict[str, Any]:
        """The server's options with the caller's own per-job choices on top (under auth)."""
        return ctx.options_for(caller)

    @router.post("/options")
    def set_options(changes: dict[str, Any], caller: Caller = CallerDep) -> None:
        """Admins (anyone without auth) set the server's options; other users their own per-job ones."""
        if ctx.is_admin(caller):
            set_options_and_model(ctx, changes)
        else:
            set_user_options(ctx, caller, changes)

    @router.post("/refresh-checkpoints", dependencies=[AdminDep])
    def refresh_checkpoints() -> None:
        """Checkpoint lists are read from disk on every request; nothing to refresh."""

    @router.post("/refresh-vae", dependencies=[AdminDep])
    def refresh_vae() -> None:
        """VAE lists are read from disk on every request."""

    @router.post("/unload-checkpoint", dependencies=[AdminDep])
    def unload_checkpoint() -> dict:
        ctx.executor.unload_model()
        return {}

    @router.post("/reload-checkpoint", dependencies=[AdminDep])
    def reload_checkpoint() -> dict:
        ctx.executor.load_model(ctx.require_checkpoint(None).name)
        return {}

    system.add_list_routes(router, ctx, AdminDep)
    add_extras_routes(router, ctx, CallerDep)
    scripts_api.add_script_routes(router, ctx)
    return router


def running_jobs(ctx: ServerContext, caller: Caller) -> list[Job]:
    """The caller's running jobs; an admin's interrupt and skip reach every running job."""
    if caller.admin:
        return ctx.jobs.list(caller, owner=None, state=RUNNING)
    return [job for job in ctx.jobs.active(caller) if job.state == RUNNING]


def progress_report(ctx: ServerContext, caller: Caller, skip_image: bool) -> dict[str, Any]:
    """A1111's progress shape for the caller's current job (running, else next queued)."""
    active = ctx.jobs.active(caller)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
             "queued_jobs": len(active)}
    if not active:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
    job = active[0]
    p = job.progress
    n_iter = JobPayload.from_json(job.params, kind=job.kind).params.n_iter
    state.update(job=job.id, job_count=max(p.job_count, n_iter, 1), job_no=p.job_no,
                 sampling_step=p.step, sampling_steps=p.steps,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)))
    if job.state != RUNNING:
        position = ctx.jobs.position(job.id)
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                "textinfo": f"Queued: {position} job(s) ahead" if position is not None else "Queued"}
    fraction = min(max(p.fraction, 0.01), 1.0)
    elapsed = time.time() - (job.started or time.time())
    preview = None if skip_image else ctx.jobs.preview(job.id)
    return {"progress": fraction, "eta_relative": max(elapsed / fraction - elapsed, 0.0), "state": state,
            "current_image": base64.b64encode(preview).decode("ascii") if preview else None,
            "textinfo": f"{p.text.capitalize()}, step {p.step}/{p.steps}" if p.text else f"Step {p.step}/{p.steps}"}


def set_user_options(ctx: ServerContext, caller: Caller, changes: dict[str, Any]) -> None:
    """A non-admin's POST /options: whitelisted keys become the caller's own defaults; a key that is not
    per-user answers 403, unless its value is what the caller already sees (a GET posted back)."""
    current = ctx.options_for(caller)
    own = {k: v for k, v in changes.items() if k in PARAM_OPTIONS}
    refused = sorted(k for k, v in changes.items() if k not in PARAM_OPTIONS and current.get(k) != v)
    if refused:
        raise HTTPException(status_code=403, detail=(
            f"Only admin users may change the server's options ({', '.join(refused)}). You may set your own "
            f"defaults for: {', '.join(PARAM_OPTIONS)}; an admin is named with --admin-users."))
    if own:
        ctx.user_options.update(caller.owner, own)


def set_options_and_model(ctx: ServerContext, changes: dict[str, Any]) -> None:
    """Set options; a new sd_model_checkpoint is loaded by the worker (which owns the model) first."""
    changes = dict(changes)
    wanted = changes.pop("sd_model_checkpoint", None)
    ctx.options.validate(changes)
    where = ("sd_model_checkpoint",)
    if wanted is None and any(key in COMPONENT_OPTIONS for key in changes):  # a new VAE / text encoder choice
        wanted, where = ctx.options.get("sd_model_checkpoint"), (next(k for k in COMPONENT_OPTIONS if k in changes),)
    if wanted is not None:
        info = ctx.find_checkpoint(str(wanted))
        if info is None:
            raise convert.RequestError(("sd_model_checkpoint",), f"Checkpoint not found: {wanted}")
        try:
            ctx.executor.load_model(info.name, ctx.components(changes))
        except AtelierError as err:
            raise convert.RequestError(where, str(err)) from None
        changes["sd_model_checkpoint"] = ctx.title(info)
    ctx.options.update(changes)
