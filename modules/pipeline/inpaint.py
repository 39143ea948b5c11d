"""Inpainting and outpainting inputs, the per-step latent blend and the paste-back (A1111's semantics).

`prepare` turns an `Img2ImgParams`' init images and mask into the working images and
mask at width x height; `paste_back` puts a generated image back over the original
through the blurred mask, so pixels outside it come back exactly as they were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from modules.errors import InvalidParams
from modules.pipeline import masks, outpaint
from modules.pipeline.params import INPAINTING_FILLS, Img2ImgParams
from modules.pipeline.resize import (
    CROP_AND_RESIZE,
    LANCZOS,
    RESIZE_AND_FILL,
    flatten,
    resize_image,
)


@dataclass
class Inputs:
    """Init images and mask, ready to encode."""

    images: list[Image.Image]  # at width x height (own size for latent upscale), masked content applied
    mask: Image.Image | None = None  # working mask at width x height (blurred; cropped for "only masked")
    originals: list[Image.Image] = field(default_factory=list)  # what results are pasted onto
    overlay: Image.Image | None = None  # paste-back mask at the originals' size
    paste_box: tuple[int, int, int, int] | None = None  # "only masked": (x, y, w, h) in the originals
    empty: bool = False  # the mask selects nothing: the job returns `originals` unchanged
    source_box: tuple[int, int, int, int] | None = None  # outpainting: (x, y, w, h) of the canvas when fitted


def prepare(p: Img2ImgParams, warnings: list[str], fields: dict[str, Any]) -> Inputs:
    """Flatten, outpaint, resize, mask, crop and fill as A1111's img2img does; records infotext `fields`."""
    images = [flatten(image) for image in p.init_images]
    mask = p.mask
    if p.outpaint is not None:
        return _fill_masked(p, _outpainted(p, images, mask, warnings, fields), fields)
    if mask is None:
        if p.resize_mode == 3:  # latent upscale: encoded at its own size, then the latents are resized
            return Inputs(images)
        return Inputs([resize_image(p.resize_mode, image, p.width, p.height) for image in images])
    if len({image.size for image in images}) > 1:
        raise InvalidParams("with a mask, every init image must have the same size")
    mask = _processed_mask(p, mask, images[0].size, warnings, fields)
    if mask.getbbox() is None:
        warnings.append("The mask is empty (nothing to repaint): the init image is returned unchanged")
        originals = images if p.inpaint_full_res else [resize_image(p.resize_mode, i, p.width, p.height)
                                                         for i in images]
        return Inputs([], originals=originals, empty=True)
    inputs = _only_masked(p, images, mask, fields) if p.inpaint_full_res else _whole_picture(p, images, mask)
    return _fill_masked(p, inputs, fields)


def _fill_masked(p: Img2ImgParams, inputs: Inputs, fields: dict[str, Any]) -> Inputs:
    """A1111's "masked content": fill (blurred surroundings), original, latent noise or latent nothing."""
    if p.inpainting_fill != 1:
        fields["Masked content"] = INPAINTING_FILLS[p.inpainting_fill]
        if p.inpainting_fill == 0:
            inputs.images = [masks.fill(image, inputs.mask) for image in inputs.images]
    return inputs


def _outpainted(p: Img2ImgParams, images: list[Image.Image], mask: Image.Image | None,
                warnings: list[str], fields: dict[str, Any]) -> Inputs:
    """The canvas (image plus padding) is the result; it is generated at width x height (fitted, aspect kept)
    and pasted back so that the original image's pixels stay exactly as they were (whole picture always)."""
    canvases = outpaint.outpaint_canvases(images, p.outpaint, p.width, p.height, warnings, fields)
    border, limit = outpaint.border_mask(images[0].size, p.outpaint, mask)
    if p.mask_blur > 0:
        border = masks.blur(border, p.mask_blur)
        fields["Mask blur"] = p.mask_blur
    overlay = outpaint.limit_overlay(outpaint.doubled(border), limit)
    if canvases[0].size == (p.width, p.height):
        return Inputs(list(canvases), border, canvases, overlay)
    box = outpaint.fit_box(canvases[0].size, p.width, p.height)
    work = [outpaint.fit_into(canvas, box, p.width, p.height) for canvas in canvases]
    work_mask = outpaint.fit_into(border, box, p.width, p.height, fill=255)
    return Inputs(work, work_mask, canvases, overlay, source_box=box)


def _processed_mask(p: Img2ImgParams, mask: Image.Image, size: tuple[int, int],
                    warnings: list[str], fields: dict[str, Any]) -> Image.Image:
    """Binary, sized as the init image, inverted and blurred as asked."""
    mask = masks.binary_mask(mask)
    if mask.size != size:
        warnings.append(f"The mask ({mask.width}x{mask.height}) is not the size of the init image "
                        f"({size[0]}x{size[1]}); it was resized to fit")
        mask = mask.resize(size, resample=LANCZOS)
    if p.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        fields["Mask mode"] = "Inpaint not masked"
    if p.mask_blur > 0:
        mask = masks.blur(mask, p.mask_blur)
        fields["Mask blur"] = p.mask_blur
    return mask


def _whole_picture(p: Img2ImgParams, images: list[Image.Image], mask: Image.Image) -> Inputs:
    work_mask = resize_image(p.resize_mode, mask, p.width, p.height)
    originals = [resize_image(p.resize_mode, image, p.width, p.height) for image in images]
    # A1111 pastes back through the blurred mask doubled: the inner half of the blur is all generated.
    overlay = Image.fromarray(np.clip(np.asarray(work_mask, dtype=np.int32) * 2, 0, 255).astype(np.uint8), "L")
    return Inputs(list(originals), work_mask, originals, overlay)


def _only_masked(p: Img2ImgParams, images: list[Image.Image], mask: Image.Image, fields: dict[str, Any]) -> Inputs:
    """Crop to the mask's box plus padding, grown to the width:height ratio, and work at width x height."""
    box = masks.crop_region(mask, p.inpaint_full_res_padding)
    x1, y1, x2, y2 = masks.expand_to_ratio(box, p.width, p.height, mask.width, mask.height)
    crop = (x1, y1, x2, y2)
    work_mask = resize_image(RESIZE_AND_FILL, mask.crop(crop), p.width, p.height)
    work = [resize_image(RESIZE_AND_FILL, image.crop(crop), p.width, p.height) for image in images]
    fields["Inpaint area"] = "Only masked"
    fields["Masked area padding"] = p.inpaint_full_res_padding
    return Inputs(work, work_mask, list(images), mask, (x1, y1, x2 - x1, y2 - y1))


def paste_back(inputs: Inputs, image: Image.Image, index: int) -> Image.Image:
    """The generated image over the original through the overlay mask (A1111's apply_overlay)."""
    original = inputs.originals[index if len(inputs.originals) > 1 else 0]
    if inputs.source_box is not None:  # outpainting at another size: the canvas part, back at its size
        x, y, w, h = inputs.source_box
        image = image.convert("RGB").crop((x, y, x + w, y + h)).resize(original.size, resample=LANCZOS)
    if inputs.paste_box is not None:
        x, y, w, h = inputs.paste_box
        canvas = Image.new("RGB", original.size)
        canvas.paste(resize_image(CROP_AND_RESIZE, image.convert("RGB"), w, h), box=(x, y))
        image = canvas
    return masks.composite(original, image, inputs.overlay)


class MaskBlend:
    """Ordinary models inpaint by keeping the init latent outside the mask: after every guided model
    call, `denoised = init * (1 - nmask) + denoised * nmask` (A1111's CFG denoiser)."""

    def __init__(self, inner, init_latent: torch.Tensor, nmask: torch.Tensor) -> None:
        self.inner = inner
        self.kept = init_latent * (1.0 - nmask)
        self.nmask = nmask

    def set_step(self, step: int) -> None:
        self.inner.set_step(step)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.kept + self.inner(x, sigma) * self.nmask

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
