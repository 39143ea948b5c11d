"""Outpainting mk2 (img2img): noise-based outpainting, next to the built-in outpaint mode.

Each chosen side is grown in its own pass: the new strip is filled with noise whose spectrum
and colours follow the known picture (the fall-off exponent shapes the spectrum, colour
variation widens the colours), then the strip and a blurred seam are inpainted with
"original" as the masked content. Sizes round up to multiples of 64, as A1111's do.
Controls in A1111 1.10's `ui()` order: info, pixels, mask_blur, direction, noise_q, color_variation.
"""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from modules.plugins import api

TITLE = "Outpainting mk2"
SIDES = ("left", "right", "up", "down")
OPTIONS = (
    api.OptionSpec("info", "Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8",
                   None, "html"),
    api.OptionSpec("pixels", "Pixels to expand", 128, "slider", 8, 256, 8),
    api.OptionSpec("mask_blur", "Mask blur", 8, "slider", 0, 64, 1),
    api.OptionSpec("direction", "Outpainting direction", list(SIDES), "multiselect", choices=SIDES),
    api.OptionSpec("noise_q", "Fall-off exponent (lower=higher detail)", 1.0, "slider", 0.0, 4.0, 0.01),
    api.OptionSpec("color_variation", "Color variation", 0.05, "slider", 0.0, 1.0, 0.01),
)


def side_pixels(size: tuple[int, int], pixels: int, direction: list[str]) -> dict[str, int]:
    """Pixels added per side so the result is a multiple of 64 each way (split as A1111 splits them)."""
    width, height = size
    grow = {side: pixels if side in direction else 0 for side in SIDES}
    for first, second, length in (("left", "right", width), ("up", "down", height)):
        total = grow[first] + grow[second]
        if total:
            extra = math.ceil((length + total) / 64) * 64 - length
            part = grow[first] * extra // total
            grow[first], grow[second] = (part, extra - part) if grow[second] else (extra, 0)
            if grow[first] and grow[second]:  # the first pass also ends on a multiple of 8
                rest = (length + grow[first]) % 8
                grow[first], grow[second] = grow[first] - rest, grow[second] + rest
    return grow


def matched_noise(image: np.ndarray, mask: np.ndarray, seed: int, noise_q: float, color_variation: float) -> np.ndarray:
    """`image` (H, W, 3 in 0..1) with its masked part (mask 1) replaced by noise shaped like the known part:
    white noise filtered by the known pixels' amplitude spectrum (to the power `noise_q`), then given their
    per-channel mean and spread, widened by `color_variation`."""
    rng = np.random.default_rng(seed)
    known = mask < 0.5
    if not known.any():
        return image
    amplitude = np.abs(np.fft.fft2(image * known[..., None], axes=(0, 1))) ** max(noise_q, 1e-3)
    white = np.fft.fft2(rng.standard_normal(image.shape), axes=(0, 1))
    shaped = np.real(np.fft.ifft2(white * amplitude, axes=(0, 1)))
    filled = ~known
    for c in range(3):
        channel, reference = shaped[..., c], image[..., c][known]
        region = channel[filled]
        spread = region.std() or 1.0
        shaped[..., c] = (channel - region.mean()) / spread * reference.std() * (1 + color_variation) + reference.mean()
    shaped += rng.standard_normal(image.shape) * color_variation * 0.1
    out = image * (1 - mask[..., None]) + shaped * mask[..., None]
    return np.clip(out, 0.0, 1.0)


def grow_canvas(image: Image.Image, side: str, amount: int, blur: int, seed: int, noise_q: float,
                variation: float) -> tuple[Image.Image, Image.Image]:
    """The image grown by `amount` on `side` with matched noise there, and its inpainting mask."""
    horizontal = side in ("left", "right")
    size = (image.width + amount, image.height) if horizontal else (image.width, image.height + amount)
    offset = {"left": (amount, 0), "up": (0, amount)}.get(side, (0, 0))
    canvas = Image.new("RGB", size)
    canvas.paste(image.convert("RGB"), offset)
    mask = Image.new("L", size, 255)
    keep = [offset[0], offset[1], offset[0] + image.width, offset[1] + image.height]
    index = {"left": 0, "up": 1, "right": 2, "down": 3}[side]
    keep[index] += blur if index < 2 else -blur  # the seam overlaps the picture by `blur` pixels
    ImageDraw.Draw(mask).rectangle((keep[0], keep[1], keep[2] - 1, keep[3] - 1), fill=0)
    pixels = np.asarray(canvas, dtype=np.float64) / 255.0
    noise_mask = np.zeros(pixels.shape[:2])
    noise_mask[np.asarray(mask) > 0] = 1.0
    noise_mask[offset[1]:offset[1] + image.height, offset[0]:offset[0] + image.width] = 0.0
    filled = matched_noise(pixels, noise_mask, seed, noise_q, variation)
    return Image.fromarray((filled * 255).round().astype(np.uint8)), mask


def _sides(args: dict) -> list[str]:
    return [side for side in SIDES if side in (args["direction"] or [])]


def check(ctx: api.ScriptCheck) -> None:
    p, args = ctx.params, ctx.args
    unknown = [d for d in args["direction"] or [] if d not in SIDES]
    if unknown or not args["direction"]:
        raise api.InvalidParams(f"Outpainting mk2: direction takes some of {', '.join(SIDES)}; got {args['direction']!r}")
    if not p.init_images:
        raise api.InvalidParams("Outpainting mk2 needs an init image")
    image = p.init_images[0]
    grow = side_pixels(image.size, int(args["pixels"]), _sides(args))
    width, height = image.width + grow["left"] + grow["right"], image.height + grow["up"] + grow["down"]
    for name, length, grown in (("width", image.width, grow["left"] + grow["right"]),
                                ("height", image.height, grow["up"] + grow["down"])):
        if not grown and length % 8:
            raise api.InvalidParams(f"Outpainting mk2: the init image's {name} ({length}) is not a multiple of 8; "
                                    "resize it first or outpaint on that axis too")
    limit = ctx.limits.max_size if ctx.limits is not None else 2048
    if max(width, height) > limit:
        raise api.InvalidParams(f"Outpainting mk2 would make a {width}x{height} image; the limit is {limit} a side")


def run(ctx: api.ScriptContext) -> api.Result:
    p, args = ctx.params, ctx.args
    sides = _sides(args)
    grow = side_pixels(p.init_images[0].size, int(args["pixels"]), sides)
    sides = [s for s in sides if grow[s]]
    count = p.batch_size * p.n_iter
    seed = random.randrange(4294967294) if p.seed == -1 else p.seed
    blur = int(args["mask_blur"])
    ctx.begin(count * len(sides))
    out = api.Result()
    for n in range(count):
        image, last = p.init_images[0], None
        for side in sides:
            if ctx.interrupted:
                out.interrupted = True
                return out
            canvas, mask = grow_canvas(image, side, grow[side], blur, seed + n, float(args["noise_q"]),
                                       float(args["color_variation"]))
            cell = dataclasses.replace(p, init_images=(canvas,), mask=mask, width=canvas.width, height=canvas.height,
                                       batch_size=1, n_iter=1, seed=seed + n, mask_blur=blur * 4, inpainting_fill=1,
                                       inpaint_full_res=False, outpaint=None, resize_mode=0, save_images=False)
            last = ctx.process(cell, label="side")
            if not last.images:
                return out
            image = last.images[0]
        text = api.with_infotext_fields(last.infotexts[0] if last and last.infotexts else "", {"Script": TITLE})
        path = ctx.save(image, seed + n, text)
        for name, value in (("images", image), ("infotexts", text), ("seeds", seed + n), ("subseeds", p.subseed),
                            ("prompts", p.prompt), ("negative_prompts", p.negative_prompt)):
            getattr(out, name).append(value)
        if path is not None:
            out.paths.append(path)
    return out


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, tabs=("img2img",), check=check, aliases=("Outpainting",), order=60,
                           description="Noise-based outpainting, one side at a time.")]
