"""A1111's Extras post-processing (upscale part): scale by / scale to with crop, two upscalers blended.

`ExtrasParams` carries A1111 1.10's field names. Upscaler "None" (or an empty name) skips that
upscaler, as in A1111. Face restoration (GFPGAN / CodeFormer visibility and CodeFormer weight)
runs in the Extras job (`modules.pipeline.extras`), before the upscale unless `upscale_first`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from modules.errors import InvalidParams

UpscaleFn = Callable[[Image.Image, float], Image.Image]  # (image, scale) -> image about `scale` times larger


@dataclass(frozen=True)
class ExtrasParams:
    resize_mode: int = 0  # 0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscale_first: bool = False

    def validate(self, max_size: int) -> None:
        for name in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidParams(f"{name} must be between 0 and 1", field=name)
        if self.resize_mode not in (0, 1):
            raise InvalidParams("resize_mode must be 0 (scale by) or 1 (scale to)", field="resize_mode")
        if self.resize_mode == 0 and not 1 <= self.upscaling_resize <= 8:
            raise InvalidParams(f"upscaling_resize must be between 1 and 8, got {self.upscaling_resize}",
                                field="upscaling_resize")
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            if self.resize_mode == 1 and not 1 <= getattr(self, name) <= max_size:
                raise InvalidParams(f"{name} must be between 1 and {max_size}", field=name)
        if not 0 <= self.extras_upscaler_2_visibility <= 1:
            raise InvalidParams("extras_upscaler_2_visibility must be between 0 and 1",
                                field="extras_upscaler_2_visibility")


def target_scale(params: ExtrasParams, size: tuple[int, int]) -> float:
    if params.resize_mode == 1:
        return max(params.upscaling_resize_w / size[0], params.upscaling_resize_h / size[1])
    return params.upscaling_resize


def _upscale_one(image: Image.Image, fn: UpscaleFn, params: ExtrasParams) -> Image.Image:
    scale = target_scale(params, image.size)
    result = fn(image, scale) if scale != 1 else image
    if params.resize_mode == 1 and params.upscaling_crop:
        w, h = params.upscaling_resize_w, params.upscaling_resize_h
        left, top = result.width // 2 - w // 2, result.height // 2 - h // 2  # A1111's centring
        result = result.crop((left, top, left + w, top + h))
    return result


def upscale(image: Image.Image, params: ExtrasParams, lookup: Callable[[str], UpscaleFn]
            ) -> tuple[Image.Image, dict[str, Any]]:
    """The upscaled image and A1111's infotext fields ("Postprocess upscale by", ...)."""
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    if params.upscaler_1 in ("", "None", None):
        return image, info
    first = _upscale_one(image, lookup(params.upscaler_1), params)
    if params.resize_mode == 1:
        info["Postprocess upscale to"] = f"{params.upscaling_resize_w}x{params.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = params.upscaling_resize
    info["Postprocess upscaler"] = params.upscaler_1
    if params.upscaler_2 not in ("", "None", None) and params.extras_upscaler_2_visibility > 0:
        second = _upscale_one(image, lookup(params.upscaler_2), params)
        if second.size != first.size:
            second = second.resize(first.size, resample=Image.Resampling.LANCZOS)
        first = Image.blend(first, second, params.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = params.upscaler_2
    return first, info
