"""A1111 requests -> plain job params; finished jobs -> A1111 responses. Fields map by name."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import secrets
import time
from pathlib import Path
from typing import Any

from PIL import Image

from modules import infotext
from modules.errors import AtelierError, InvalidParams
from modules.jobs.model import Job
from modules.server.context import ServerContext
from modules.server.options import apply_overrides
from modules.server.schemas import Img2ImgRequest, Txt2ImgRequest

IMAGE_FIELDS = ("init_images", "mask")
SERVER_ONLY = ("outdir", "max_size", *IMAGE_FIELDS)  # never taken from a client
ZERO_MEANS_DEFAULT = ("s_churn", "s_tmin", "s_tmax", "s_noise")  # A1111: `value or default`


class RequestError(AtelierError):
    """A field-level problem with a request; answered 422 in FastAPI's error shape."""

    def __init__(self, loc: tuple, message: str) -> None:
        super().__init__(message)
        self.loc = ("body", *loc)

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": list(self.loc), "msg": str(self), "type": "value_error"}]


def params_class(kind: str):
    from modules.pipeline import params

    if kind == "txt2img":
        return params.Txt2ImgParams
    cls = getattr(params, "Img2ImgParams", None)
    if cls is None:
        raise RequestError(("init_images",), "img2img is not available in this build yet.")
    return cls


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
    except (binascii.Error, ValueError):
        raise RequestError(loc, "not valid base64") from None
    except Exception:  # Pillow raises many kinds of errors on junk bytes
        raise RequestError(loc, "not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    return image


def _field_of(message: str, names: set[str]) -> str:
    first = message.split(" ", 1)[0]
    return first if first in names else "params"


def _check_request(ctx: ServerContext, req: Txt2ImgRequest) -> None:
    limit = ctx.config.max_prompt_chars
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        if len(getattr(req, name)) > limit:
            raise RequestError((name,), f"{name} is {len(getattr(req, name))} characters; the limit is {limit}")
    for name in ("restore_faces", "tiling"):
        if getattr(req, name):
            raise RequestError((name,), f"{name} is not supported by Atelier yet")
    if req.script_name:
        raise RequestError(("script_name",), f"Script {req.script_name!r} not found")
    registries = ctx.app.registries
    sampler = req.sampler_name or req.sampler_index or "Euler"
    if sampler not in registries.samplers:
        raise RequestError(("sampler_name",), f"Unknown sampler {sampler!r}. Known: {', '.join(registries.samplers.names())}")
    if req.scheduler and req.scheduler.lower() != "automatic" and req.scheduler not in registries.schedulers:
        raise RequestError(("scheduler",), f"Unknown scheduler {req.scheduler!r}. "
                                          f"Known: Automatic, {', '.join(registries.schedulers.names())}")


def _checkpoint(ctx: ServerContext, overrides: dict[str, Any]) -> str:
    try:
        return ctx.require_checkpoint(overrides.get("sd_model_checkpoint")).name
    except AtelierError as err:
        raise RequestError(("override_settings", "sd_model_checkpoint"), str(err)) from None


def _param_values(ctx: ServerContext, req: Txt2ImgRequest, names: set[str]) -> dict[str, Any]:
    values = {k: v for k, v in req.model_dump().items() if k in names and k not in SERVER_ONLY}
    values.update(sampler_name=req.sampler_name or req.sampler_index or "Euler",
                  scheduler=req.scheduler or "Automatic", save_images=req.save_images)
    for name in ZERO_MEANS_DEFAULT:
        if name in values and not values[name]:
            values[name] = None
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if values.get(name) == -1:
            values[name] = 0
    # None means "not set" in A1111 requests: the params' own default applies.
    return {**ctx.options.job_defaults(names), **{k: v for k, v in values.items() if v is not None}}


def _save_inputs(ctx: ServerContext, images: dict[str, Any]) -> dict[str, Any]:
    """Decoded input images go to files beside the job, so job data stays small and plain."""
    folder = ctx.data_dir / "job-inputs" / f"{time.strftime('%Y%m%d')}-{secrets.token_hex(8)}"
    folder.mkdir(parents=True, exist_ok=True)
    stored: dict[str, Any] = {}
    for name, value in images.items():
        group = value if isinstance(value, list) else [value]
        paths = []
        for n, image in enumerate(group):
            path = folder / f"{name}-{n}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(str(path))
        stored[name] = paths if isinstance(value, list) else paths[0]
    return stored


def _extension_args(scripts: dict[str, Any], names: set[str]) -> dict[str, dict[str, Any]]:
    """`alwayson_scripts` -> the params' `extension_args`, by extension name; options go by name too."""
    if "extension_args" not in names:
        raise RequestError(("alwayson_scripts", next(iter(scripts))), "always-on script not found")
    result = {}
    for name, spec in scripts.items():
        args = spec.get("args", spec) if isinstance(spec, dict) else spec
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


def job_params(ctx: ServerContext, kind: str, req: Txt2ImgRequest) -> dict[str, Any]:
    """Validate a request and return the job's plain params; raises RequestError (422)."""
    _check_request(ctx, req)
    images = _input_images(ctx, kind, req)
    cls = params_class(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    if req.enable_hr and "enable_hr" not in names:
        raise RequestError(("enable_hr",), "hires fix is not available in this build yet")
    values = _param_values(ctx, req, names)
    values.pop("alwayson_scripts", None)
    if req.alwayson_scripts:
        values["extension_args"] = _extension_args(req.alwayson_scripts, names)
    overrides = dict(req.override_settings or {})
    checkpoint = _checkpoint(ctx, overrides)
    try:
        params = cls(**values, **{k: v for k, v in images.items() if k in names})
        try:
            params, warnings = apply_overrides(params, overrides)
        except InvalidParams as err:
            raise RequestError(("override_settings", _field_of(str(err), set(overrides))), str(err)) from None
        params.validate(ctx.app.settings.limits)
    except InvalidParams as err:
        raise RequestError((_field_of(str(err), names),), str(err)) from None
    except TypeError as err:
        raise RequestError(("params",), str(err)) from None
    plain = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in SERVER_ONLY}
    return {"checkpoint": checkpoint, "params": json.loads(json.dumps(plain, default=str)),
            "inputs": _save_inputs(ctx, images), "warnings": warnings,
            "request": _request_record(req)}


def _request_record(req: Txt2ImgRequest) -> dict[str, Any]:
    """The request as A1111 echoes it in `parameters`, without the input images."""
    data = req.model_dump()
    for name in ("init_images", "mask"):
        if name in data:
            data[name] = None
    return data


def image_b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def a1111_info(job: Job) -> dict[str, Any]:
    """The `info` object A1111 returns (as a JSON string) for a finished job."""
    p = job.params.get("params", {})
    result = job.result
    texts = result.infotexts if result else []
    first = infotext.parse(texts[0]) if texts else {}
    seeds = result.seeds if result else []
    return {
        "prompt": p.get("prompt", ""), "all_prompts": result.prompts if result else [],
        "negative_prompt": p.get("negative_prompt", ""),
        "all_negative_prompts": result.negative_prompts if result else [],
        "seed": seeds[0] if seeds else p.get("seed"), "all_seeds": seeds,
        "subseed": result.subseeds[0] if result and result.subseeds else p.get("subseed"),
        "all_subseeds": result.subseeds if result else [], "subseed_strength": p.get("subseed_strength"),
        "width": p.get("width"), "height": p.get("height"), "sampler_name": p.get("sampler_name"),
        "cfg_scale": p.get("cfg_scale"), "steps": p.get("steps"), "batch_size": p.get("batch_size"),
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"), "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": p.get("seed_resize_from_w"), "seed_resize_from_h": p.get("seed_resize_from_h"),
        "denoising_strength": p.get("denoising_strength"), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": p.get("clip_skip"), "is_using_inpainting_conditioning": False,
        "version": first.get("Version"), "job_id": job.id,
        "interrupted": bool(result and result.interrupted),
        "warnings": [*job.params.get("warnings", []), *(result.warnings if result else [])],
    }


def a1111_response(job: Job, send_images: bool) -> dict[str, Any]:
    images = [image_b64(p) for p in job.result.images] if send_images and job.result else []
    return {"images": images, "parameters": job.params.get("request", {}), "info": json.dumps(a1111_info(job))}
