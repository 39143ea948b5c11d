"""A1111 requests -> plain job params; finished jobs -> A1111 responses. Fields map by name."""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from modules import infotext
from modules.checkpoints.mmdit import is_flow_file
from modules.errors import AtelierError, InvalidParams
from modules.jobs.model import Caller, Job
from modules.jobs.payload import JobPayload, field_names, params_class
from modules.jobs.submit import Submission
from modules.pipeline.params import GenerationParams
from modules.server.context import ServerContext
from modules.server.schemas import Img2ImgRequest, Txt2ImgRequest

ZERO_MEANS_DEFAULT = ("s_churn", "s_tmin", "s_tmax", "s_noise")  # A1111: `value or default`


class RequestError(AtelierError):
    """A field-level problem with a request; answered 422 in FastAPI's error shape."""

    def __init__(self, loc: tuple, message: str) -> None:
        super().__init__(message)
        self.loc = ("body", *loc)

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": list(self.loc), "msg": str(self), "type": "value_error"}]


def decode_image(data: Any, loc: tuple, max_size: int) -> Image.Image:
    """Plain base64 or a data:image/...;base64, URL -> a loaded PIL image, or a 422."""
    if not isinstance(data, str) or not data:
        raise RequestError(loc, "expected a base64-encoded image")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise RequestError(loc, "data URLs must look like data:image/png;base64,...")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > max_size:
            raise RequestError(loc, f"image is {image.width}x{image.height}; the limit is {max_size} a side")
        image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as err:
        raise RequestError(loc, f"image refused as a decompression bomb ({err}); send at most {max_size} "
                                "pixels a side") from None
    except (binascii.Error, ValueError):
        raise RequestError(loc, "not valid base64") from None
    except Exception:  # Pillow raises many kinds of errors on junk bytes
        raise RequestError(loc, "not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    return image


def _check_request(ctx: ServerContext, req: Txt2ImgRequest) -> None:
    """What only A1111 requests can get wrong; the submit service checks the params themselves."""
    limit = ctx.config.max_prompt_chars
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        if len(getattr(req, name)) > limit:
            raise RequestError((name,), f"{name} is {len(getattr(req, name))} characters; the limit is {limit}")


def _param_values(req: Txt2ImgRequest, names: frozenset[str],
                  extension: Callable[[str], str | None] = lambda _: None) -> dict[str, Any]:
    """A1111 request fields -> params fields by name; None means "not set" (the params' default)."""
    values = {k: v for k, v in req.model_dump().items() if k in names}
    values.update(sampler_name=req.sampler_name or req.sampler_index or "Euler",
                  scheduler=req.scheduler or "Automatic", save_images=req.save_images)
    for name in ZERO_MEANS_DEFAULT:
        if name in values and not values[name]:
            values[name] = None
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if values.get(name) == -1:
            values[name] = 0
    if req.enable_hr and "enable_hr" not in names:
        raise RequestError(("enable_hr",), "hires fix is only for txt2img")
    if req.alwayson_scripts:
        values["extension_args"] = _extension_args(req.alwayson_scripts, names, extension)
    return {k: v for k, v in values.items() if v is not None}


def _extension_args(scripts: dict[str, Any], names: frozenset[str],
                    extension: Callable[[str], str | None]) -> dict[str, dict[str, Any]]:
    """`alwayson_scripts` -> the params' `extension_args`, by extension name; options go by name too.

    A list `args` (A1111's positional form) goes to a loaded extension, matched case-insensitively,
    as `{"args": [...]}`; the extension reads it itself (the bundled controlnet does).
    """
    if "extension_args" not in names:
        raise RequestError(("alwayson_scripts", next(iter(scripts))), "always-on script not found")
    result = {}
    for name, spec in scripts.items():
        args = spec.get("args", spec) if isinstance(spec, dict) else spec
        owner = extension(name)
        if isinstance(args, list | tuple) and owner is not None:
            result[owner] = {"args": list(args)}
            continue
        if not isinstance(args, dict):
            raise RequestError(("alwayson_scripts", name, "args"),
                               'positional script args are not supported; send {"args": {"option": value}}')
        result[name] = args
    return result


def _input_images(ctx: ServerContext, kind: str, req: Txt2ImgRequest) -> dict[str, Any]:
    images: dict[str, Any] = {}
    if isinstance(req, Img2ImgRequest):
        if not req.init_images:
            raise RequestError(("init_images",), "init_images needs at least one image")
        size = ctx.app.settings.max_size
        images["init_images"] = [decode_image(d, ("init_images", n), size) for n, d in enumerate(req.init_images)]
        if req.mask:
            images["mask"] = decode_image(req.mask, ("mask",), size)
        elif kind == "inpaint":
            raise RequestError(("mask",), "inpaint needs a mask")
    return images


def _loaded_extension(ctx: ServerContext, name: str) -> str | None:
    """The loaded extension `name` names (case-insensitively), or None."""
    return next((e.name for e in ctx.app.plugins.extensions if e.loaded and e.name.lower() == name.lower()), None)


def submission(ctx: ServerContext, kind: str, req: Txt2ImgRequest, source: str = "api") -> Submission:
    """An A1111 request as the submit service takes it; raises RequestError (422) for request-only faults."""
    _check_request(ctx, req)
    images = _input_images(ctx, kind, req)
    job_kind = "img2img" if kind == "inpaint" else kind
    overrides = dict(req.override_settings or {})
    values = _param_values(req, field_names(params_class(job_kind)), lambda name: _loaded_extension(ctx, name))
    if _targets_flow_model(ctx, overrides.get("sd_model_checkpoint")):
        values["model_defaults"] = omitted_model_defaults(req)
    return Submission(job_kind, values, images,
                      checkpoint=overrides.get("sd_model_checkpoint"), overrides=overrides,
                      request=_request_record(req), source=source,
                      script={"name": req.script_name, "args": req.script_args} if req.script_name else None)


FAMILY_DEFAULT_FIELDS = ("steps", "cfg_scale", "distilled_cfg_scale", "sampler_name", "scheduler")


def omitted_model_defaults(req: Txt2ImgRequest) -> tuple[str, ...]:
    """The generation fields a request leaves out. On SD models they keep A1111's defaults (steps 50, CFG 7, ...);
    on FLUX.1 / SD3.5 they take the family's (FLUX.1-dev: 20 steps, CFG 1, Distilled CFG 3.5, Euler, Simple)."""
    sent = set(req.model_fields_set)
    if "sampler_index" in sent:
        sent.add("sampler_name")
    return tuple(name for name in FAMILY_DEFAULT_FIELDS if name not in sent)


def _targets_flow_model(ctx: ServerContext, checkpoint: str | None) -> bool:
    """Whether the request's checkpoint (its override, else the current one) is FLUX.1 / SD3.5 (file header only)."""
    name = checkpoint or ctx.options.get("sd_model_checkpoint")
    info = ctx.find_checkpoint(str(name)) if name else None
    return info is not None and is_flow_file(info.path)


def submit(ctx: ServerContext, caller: Caller, kind: str, req: Txt2ImgRequest, source: str = "api") -> Job:
    """Validate and queue an A1111 request for `caller`; a bad field is a RequestError at its place."""
    sub = submission(ctx, kind, req, source)
    try:
        return ctx.submitter.submit(caller, sub)
    except InvalidParams as err:
        raise RequestError(_location(err.field, sub.overrides), str(err)) from None


def _location(field: str | None, overrides: dict[str, Any]) -> tuple:
    if field in ("script_name", "script_args"):
        return (field,)
    if field == "sd_model_checkpoint" or field in overrides:
        return ("override_settings", field)
    return (field or "params",)


def _request_record(req: Txt2ImgRequest) -> dict[str, Any]:
    """The request as A1111 echoes it in `parameters`, without the input images."""
    data = req.model_dump(exclude=set(FORGE_FIELDS)) | req.model_dump(exclude_unset=True, include=set(FORGE_FIELDS))
    for name in ("init_images", "mask"):
        if name in data:
            data[name] = None
    return data


FORGE_FIELDS = ("distilled_cfg_scale", "shift")  # echoed only when sent: A1111's `parameters` stay as they were


def image_b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def a1111_info(job: Job) -> dict[str, Any]:
    """The `info` object A1111 returns (as a JSON string) for a job, written from its payload."""
    payload = JobPayload.from_json(job.params, kind=job.kind)
    p, result = payload.params, job.result
    texts = result.infotexts if result else []
    if not isinstance(p, GenerationParams):  # an Extras job has no generation fields
        return {"infotexts": texts, "job_id": job.id, "interrupted": bool(result and result.interrupted),
                "warnings": [*payload.warnings, *(result.warnings if result else [])]}
    first = infotext.parse(texts[0]) if texts else {}
    seeds = result.seeds if result else []
    return {
        "prompt": p.prompt, "all_prompts": result.prompts if result else [],
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": result.negative_prompts if result else [],
        "seed": seeds[0] if seeds else p.seed, "all_seeds": seeds,
        "subseed": result.subseeds[0] if result and result.subseeds else p.subseed,
        "all_subseeds": result.subseeds if result else [], "subseed_strength": p.subseed_strength,
        "width": p.width, "height": p.height, "sampler_name": p.sampler_name,
        "cfg_scale": p.cfg_scale, "steps": p.steps, "batch_size": p.batch_size,
        "restore_faces": bool(getattr(p, "restore_faces", False)),
        "face_restoration_model": p.face_restoration_model if getattr(p, "restore_faces", False) else None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"), "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": p.seed_resize_from_w, "seed_resize_from_h": p.seed_resize_from_h,
        "denoising_strength": getattr(p, "denoising_strength", None), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": False,
        "version": first.get("Version"), "job_id": job.id,
        "interrupted": bool(result and result.interrupted),
        "warnings": [*payload.warnings, *(result.warnings if result else [])],
    }


def a1111_response(job: Job, send_images: bool) -> dict[str, Any]:
    images = [image_b64(p) for p in job.result.images] if send_images and job.result else []
    return {"images": images, "parameters": JobPayload.from_json(job.params, kind=job.kind).request,
            "info": json.dumps(a1111_info(job))}
