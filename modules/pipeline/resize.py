"""A1111's image resize modes, flattening of transparency and edge extension for outpainting.

Modes (A1111's `resize_mode`): 0 just resize, 1 crop and resize, 2 resize and fill,
3 latent upscale (the image is encoded at its own size and its latents are resized;
see `modules.pipeline.img2img`). Pixel resizes use Lanczos, as A1111 does when no
img2img upscaler is chosen.
"""
from __future__ import annotations

from PIL import Image

from modules.errors import InvalidParams

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_UPSCALE = 0, 1, 2, 3
LANCZOS = Image.Resampling.LANCZOS


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB, with any transparency composited over `background` (A1111's img2img background colour)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize `image` to `width` x `height` by A1111's resize mode (3 behaves as 2 for pixels)."""
    if mode == JUST_RESIZE:
        return image.resize((width, height), resample=LANCZOS)
    if mode == CROP_AND_RESIZE:
        return _crop_and_resize(image, width, height)
    if mode in (RESIZE_AND_FILL, LATENT_UPSCALE):
        return _resize_and_fill(image, width, height)
    raise InvalidParams(f"resize_mode must be 0, 1, 2 or 3, got {mode!r}")


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover the target, keeping the aspect ratio, and crop the centre."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside the target, centre it, and fill the rest from the stretched edges."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:  # bands above and below
        band = height // 2 - src_h // 2
        if band > 0:
            canvas.paste(_stretch_row(resized, 0, width, band), box=(0, 0))
            canvas.paste(_stretch_row(resized, resized.height, width, band), box=(0, band + src_h))
    elif ratio > src_ratio:  # bands left and right
        band = width // 2 - src_w // 2
        if band > 0:
            canvas.paste(_stretch_column(resized, 0, band, height), box=(0, 0))
            canvas.paste(_stretch_column(resized, resized.width, band, height), box=(band + src_w, 0))
    return canvas


def _stretch_row(image: Image.Image, y: int, width: int, height: int) -> Image.Image:
    """The image's edge at row `y` (0 or its height), stretched to `width` x `height`."""
    return image.resize((width, height), resample=LANCZOS, box=(0, y, image.width, y))


def _stretch_column(image: Image.Image, x: int, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=LANCZOS, box=(x, 0, x, image.height))


def extend_edges(image: Image.Image, left: int, right: int, up: int, down: int) -> Image.Image:
    """Add borders filled from the stretched edges (resize-and-fill's fill), for outpainting.

    The original lands at (left, up) unchanged; rows are extended first, then columns.
    """
    tall = Image.new(image.mode, (image.width, image.height + up + down))
    tall.paste(image, box=(0, up))
    if up:
        tall.paste(_stretch_row(image, 0, image.width, up), box=(0, 0))
    if down:
        tall.paste(_stretch_row(image, image.height, image.width, down), box=(0, up + image.height))
    wide = Image.new(image.mode, (tall.width + left + right, tall.height))
    wide.paste(tall, box=(left, 0))
    if left:
        wide.paste(_stretch_column(tall, 0, left, tall.height), box=(0, 0))
    if right:
        wide.paste(_stretch_column(tall, tall.width, right, tall.height), box=(left + tall.width, 0))
    return wide
