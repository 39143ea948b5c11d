"""Outpainting inputs: the canvas is the init image plus the padding, and the original stays untouched.

The canvas (init image extended by its stretched edges) is the result's size. When width x height
is the canvas size it is generated as is; otherwise the canvas is fitted into width x height with
its aspect kept (the bands around it are generated and cut away), and the generated picture is
scaled back to the canvas. Either way the paste-back mask is zero over the original image (except
where the user's own mask asks to repaint), so those pixels come back exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageChops

from modules.errors import InvalidParams
from modules.pipeline import masks
from modules.pipeline.resize import LANCZOS, extend_edges


def canvas_size(image_size: tuple[int, int], pads: tuple[int, int, int, int]) -> tuple[int, int]:
    left, right, up, down = pads
    return image_size[0] + left + right, image_size[1] + up + down


def fit_box(canvas: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h): where the canvas lands, scaled to fit inside width x height and centred."""
    scale = min(width / canvas[0], height / canvas[1])
    w, h = max(1, min(width, round(canvas[0] * scale))), max(1, min(height, round(canvas[1] * scale)))
    return (width - w) // 2, (height - h) // 2, w, h


def border_mask(image_size: tuple[int, int], pads: tuple[int, int, int, int],
                user_mask: Image.Image | None) -> tuple[Image.Image, Image.Image]:
    """(mask to repaint, paste-back limit) at the canvas size: the new borders, plus the user's mask inside."""
    size = canvas_size(image_size, pads)
    inside = Image.new("L", image_size, 0)
    if user_mask is not None:
        inside = masks.binary_mask(user_mask)
        if inside.size != image_size:
            inside = inside.resize(image_size, resample=LANCZOS)
    mask = Image.new("L", size, 255)
    mask.paste(inside, box=(pads[0], pads[2]))
    return mask, mask.copy()


def limit_overlay(overlay: Image.Image, limit: Image.Image) -> Image.Image:
    """The paste-back mask cut to `limit`: zero over the original image's untouched pixels."""
    return ImageChops.darker(overlay, limit)


def doubled(mask: Image.Image) -> Image.Image:
    """A1111's paste-back mask: the blurred mask doubled, so the inner half of the blur is all generated."""
    return Image.fromarray(np.clip(np.asarray(mask, dtype=np.int32) * 2, 0, 255).astype(np.uint8), "L")


def fit_into(image: Image.Image, box: tuple[int, int, int, int], width: int, height: int,
             fill: int | None = None) -> Image.Image:
    """`image` scaled into `box` of a width x height picture; the rest is `fill`, or stretched edges."""
    x, y, w, h = box
    scaled = image.resize((w, h), resample=LANCZOS)
    if fill is None:
        return extend_edges(scaled, x, width - w - x, y, height - h - y)
    picture = Image.new(image.mode, (width, height), fill)
    picture.paste(scaled, box=(x, y))
    return picture


def outpaint_canvases(images: list[Image.Image], pads: tuple[int, int, int, int],
                      width: int, height: int, warnings: list[str], fields: dict[str, Any]) -> list[Image.Image]:
    """Each init image extended by the padding; warns when the canvas is generated at another size."""
    if len({image.size for image in images}) > 1:
        raise InvalidParams("for outpainting, every init image must have the same size")
    size = canvas_size(images[0].size, pads)
    if size != (width, height):
        _, _, w, h = fit_box(size, width, height)
        warnings.append(f"Outpainting keeps the {images[0].width}x{images[0].height} image whole: the result is "
                        f"the {size[0]}x{size[1]} canvas (the image plus the padding). It was generated at "
                        f"{w}x{h} inside the {width}x{height} asked, keeping its aspect; set width and height to "
                        f"{size[0] // 8 * 8}x{size[1] // 8 * 8} to generate it at full size")
    fields["Outpaint"] = ",".join(str(p) for p in pads)
    return [extend_edges(image, *pads) for image in images]
