"""Inpainting masks with A1111's semantics: binarise, invert, blur, crop region, fill, latent mask, paste-back.

White (255) marks pixels to repaint. Masks are PIL "L" images until they become latents.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

# A1111's "fill": composite ever sharper blurs of the unmasked picture: (radius, repeats).
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def binary_mask(mask: Image.Image) -> Image.Image:
    """An "L" mask. An RGBA mask that is not fully opaque uses its alpha, cut at 128 (A1111)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = np.asarray(mask.getchannel("A"))
        return Image.fromarray(np.where(alpha > 128, 255, 0).astype(np.uint8), "L")
    return mask.convert("L")


def alpha_mask(image: Image.Image) -> Image.Image:
    """The mask of an image's transparent pixels: every pixel that is not fully opaque is repainted."""
    if "A" not in image.getbands():
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        else:
            return Image.new("L", image.size, 0)
    alpha = np.asarray(image.getchannel("A"))
    return Image.fromarray(np.where(alpha < 255, 255, 0).astype(np.uint8), "L")


def blur_kernel_size(sigma: float) -> int:
    """A1111's Gaussian kernel width for a mask blur of `sigma` pixels."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _gaussian_1d(sigma: float) -> np.ndarray:
    size = blur_kernel_size(sigma)
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur_axis(array: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Convolve along one axis with mirrored borders (OpenCV's default BORDER_REFLECT_101)."""
    kernel = _gaussian_1d(sigma)
    radius = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="reflect")
    out = np.zeros(array.shape, dtype=np.float64)
    length = array.shape[axis]
    for i, weight in enumerate(kernel):
        out += weight * (padded[i : i + length] if axis == 0 else padded[:, i : i + length])
    return out


def blur(mask: Image.Image, sigma_x: float, sigma_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a horizontal, then a vertical Gaussian of the given sigmas, rounded to 8 bits."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    array = np.asarray(mask.convert("L"), dtype=np.float64)
    if sigma_x > 0:
        array = np.clip(np.rint(_blur_axis(array, sigma_x, axis=1)), 0, 255)
    if sigma_y > 0:
        array = np.clip(np.rint(_blur_axis(array, sigma_y, axis=0)), 0, 255)
    return Image.fromarray(array.astype(np.uint8), "L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels plus `padding`; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int,
                    image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow `box` to the `width`:`height` aspect ratio, shifted back inside the image (A1111)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    start -= grow // 2
    end += grow - grow // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the masked area takes the colours around it (A1111's blur compositing)."""
    holed = Image.new("RGBa", image.size)
    holed.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = holed.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def latent_mask(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """The mask at latent size, rounded to 0 or 1: [1, 1, height, width] (1 = repaint)."""
    small = mask.convert("L").resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.around(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(array)[None, None]


def conditioning_mask(mask: Image.Image) -> torch.Tensor:
    """The 9-channel models' mask at image size, rounded to 0 or 1: [1, 1, H, W]."""
    array = np.around(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return torch.from_numpy(array)[None, None]


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """original * (1 - m) + generated * m: where the mask is 0 the original's pixels come back exactly."""
    m = np.asarray(mask.convert("L"), dtype=np.float64)[..., None] / 255.0
    a = np.asarray(original.convert("RGB"), dtype=np.float64)
    b = np.asarray(generated.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.rint(a * (1.0 - m) + b * m).astype(np.uint8), "RGB")
