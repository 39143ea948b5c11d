"""A1111's Extras API: /sdapi/v1/extra-single-image and /sdapi/v1/extra-batch-images (1.10 fields).

Each request is one "extras" job on the caller's fair queue (validated once by the submit service,
run by the executor, interruptible, in the caller's history), upscaled with the app's upscaler
registry, faces restored with its face restorers (docs/faces.md); a GFPGAN or CodeFormer
visibility above 0 without the weight files is answered 422 with the missing files named.
"""
from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modules.jobs.model import FAILED, Caller, Job
from modules.jobs.submit import Submission
from modules.server.context import ServerContext
from modules.server.convert import RequestError, decode_image
from modules.server.interrogate_api import run_interrogation
from modules.upscalers.extras import ExtrasParams


class ExtrasBaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize, 1: scale to w x h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(2, ge=1, le=8, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="base64 image")


class FileData(BaseModel):
    data: str = Field(description="base64 image")
    name: str = Field(description="file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="images as base64 with their names")  # noqa: N815


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field("", description="base64 image")
    model: str = Field("clip", description="clip or deepdanbooru")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def extras_values(req: ExtrasBaseRequest) -> dict[str, Any]:
    """The request's Extras fields by name (the job params' own names)."""
    names = {f.name for f in dataclasses.fields(ExtrasParams)}
    return {k: v for k, v in req.model_dump().items() if k in names}


async def run_extras_job(request: Request, ctx: ServerContext, caller: Caller, req: ExtrasBaseRequest,
                         images: list[Image.Image], source: str = "api") -> Job:
    """Queue an Extras job for `caller` (validated once by the submit service) and wait for it to end."""
    echoed = req.model_dump(exclude={"image", "imageList"})
    submission = Submission("extras", extras_values(req), {"init_images": images}, request=echoed, source=source)
    job = await run_in_threadpool(ctx.submitter.submit, caller, submission)
    return await request.app.state.hub.wait(job.id, caller)


def _failed(job: Job) -> JSONResponse:
    status = 422 if job.error_kind == "invalid" else 500  # refused at run time (e.g. a broken model file)
    return JSONResponse(status_code=status, content={"error": "JobFailed", "detail": job.error, "job_id": job.id})


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _info(job: Job) -> str:
    return job.result.infotexts[-1] if job.result and job.result.infotexts else ""


def add_extras_routes(router: APIRouter, ctx: ServerContext, caller_dep: Any) -> None:
    max_size = ctx.app.settings.limits.max_size

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(req: ExtrasSingleImageRequest, request: Request, caller: Caller = caller_dep):
        image = decode_image(req.image, ("image",), max_size)
        job = await run_extras_job(request, ctx, caller, req, [image])
        if job.state == FAILED:
            return _failed(job)
        images = job.result.images if job.result else []
        return {"html_info": _info(job), "image": _b64(images[0]) if images and req.show_extras_results else None}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request, caller: Caller = caller_dep):
        if not req.imageList:
            raise RequestError(("imageList",), "imageList is empty: send at least one image")
        images = [decode_image(item.data, ("imageList", i, "data"), max_size)
                  for i, item in enumerate(req.imageList)]
        job = await run_extras_job(request, ctx, caller, req, images)
        if job.state == FAILED:
            return _failed(job)
        paths = job.result.images if job.result else []
        return {"html_info": _info(job), "images": [_b64(p) for p in paths] if req.show_extras_results else []}

    @router.post("/interrogate")
    async def interrogate(req: InterrogateRequest, caller: Caller = caller_dep) -> dict[str, Any]:
        return await run_interrogation(ctx, req.image, req.model, caller)
