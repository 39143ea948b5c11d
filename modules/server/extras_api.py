"""A1111's Extras API: /sdapi/v1/extra-single-image and /sdapi/v1/extra-batch-images (1.10 fields).

The upscale runs on a server thread through `modules.upscalers.extras`, with the upscalers of the
app's registry (model files, Lanczos, Nearest). Face restoration is not implemented: a GFPGAN or
CodeFormer visibility above 0 is answered 422 with the missing files named.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modules.errors import InvalidParams
from modules.server.context import ServerContext
from modules.server.convert import RequestError, decode_image
from modules.upscalers import extras

OUTPUT_SIDE_FACTOR = 4  # an Extras result may be up to 4x --max-size a side (16384 by default)


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


def extras_params(req: ExtrasBaseRequest) -> extras.ExtrasParams:
    names = extras.ExtrasParams.__dataclass_fields__
    return extras.ExtrasParams(**{k: v for k, v in req.model_dump().items() if k in names})


def upscaler_lookup(registries: Any, progress: Callable[[int, int], None] | None = None
                    ) -> Callable[[str], extras.UpscaleFn]:
    """Pixel upscalers by name for Extras; model upscalers report `progress(done, total)` per tile."""
    def lookup(name: str) -> extras.UpscaleFn:
        spec = registries.upscalers.get(name)
        if spec.is_latent:
            raise InvalidParams(f"{name!r} is a latent upscaler (hires fix only); Extras needs a pixel upscaler")
        if spec.model_path and progress is not None:
            return lambda image, scale: spec.function(image, scale, progress=progress)
        return spec.function

    return lookup


def check_names(registries: Any, params: extras.ExtrasParams) -> None:
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(params, field)
        if name not in ("", "None") and (name not in registries.upscalers or
                                         registries.upscalers.get(name).is_latent):
            known = [s.name for s in registries.upscalers if not s.is_latent]
            raise InvalidParams(f"Unknown upscaler {name!r} for {field}. Known: {', '.join(known)}", field=field)


def run_extras(ctx: ServerContext, images: list[Image.Image], params: extras.ExtrasParams,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[Image.Image], str]:
    """Validate once, then upscale every image; the infotext of the last one as `html_info`."""
    limit = ctx.app.settings.limits.max_size
    params.validate(limit)
    check_names(ctx.app.registries, params)
    for image in images:
        scale = extras.target_scale(params, image.size) if params.upscaler_1 not in ("", "None") else 1
        if max(image.size) * scale > limit * OUTPUT_SIDE_FACTOR:
            raise InvalidParams(f"the result would be {round(image.width * scale)}x{round(image.height * scale)}; "
                                f"the limit is {limit * OUTPUT_SIDE_FACTOR} a side (4x --max-size)",
                                field="upscaling_resize")
    lookup = upscaler_lookup(ctx.app.registries, progress)
    results, info = [], {}
    for image in images:
        result, info = extras.upscale(image, params, lookup)
        results.append(result)
    return results, ", ".join(f"{k}: {v}" for k, v in info.items())


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def add_extras_routes(router: APIRouter, ctx: ServerContext, caller_dep: Any) -> None:
    max_size = ctx.app.settings.limits.max_size

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, dependencies=[caller_dep])
    async def extra_single_image(req: ExtrasSingleImageRequest) -> dict[str, Any]:
        image = decode_image(req.image, ("image",), max_size)
        results, info = await run_in_threadpool(run_extras, ctx, [image], extras_params(req))
        return {"html_info": info, "image": _b64(results[0]) if req.show_extras_results else None}

    @router.post("/interrogate", dependencies=[caller_dep])
    def interrogate(req: InterrogateRequest) -> dict[str, Any]:
        if req.model not in ("clip", "deepdanbooru"):
            raise InvalidParams(f"Unknown interrogation model {req.model!r}; A1111's are clip and deepdanbooru",
                                field="model")
        raise InvalidParams(f"Interrogation ({req.model}) is not available in Atelier yet: no captioning or "
                            "tagging model is supported so far.", field="model")

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, dependencies=[caller_dep])
    async def extra_batch_images(req: ExtrasBatchImagesRequest) -> dict[str, Any]:
        if not req.imageList:
            raise RequestError(("imageList",), "imageList is empty: send at least one image")
        images = [decode_image(item.data, ("imageList", i, "data"), max_size)
                  for i, item in enumerate(req.imageList)]
        results, info = await run_in_threadpool(run_extras, ctx, images, extras_params(req))
        return {"html_info": info, "images": [_b64(r) for r in results] if req.show_extras_results else []}
