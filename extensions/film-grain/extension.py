"""Film grain: a post-processor with UI options, recorded in infotext.

The grain is Gaussian noise drawn from the image's own seed, so the same seed gives
the same grain. Options (in `extension_args["film-grain"]` and the UI section):
strength (standard deviation as a fraction of the 0-255 range), grain size in
pixels, and monochrome grain.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from modules.plugins import api

OPTIONS = (
    api.OptionSpec("strength", "Strength", 0.08, "slider", 0.0, 1.0, 0.01, infotext="Film grain"),
    api.OptionSpec("size", "Grain size", 1, "slider", 1, 8, 1, infotext="Film grain size"),
    api.OptionSpec("monochrome", "Monochrome", True, "checkbox", infotext="Film grain mono"),
)


def add_grain(image: Image.Image, seed: int, strength: float, size: int = 1, monochrome: bool = True) -> Image.Image:
    if not 0.0 <= strength <= 1.0 or not 1 <= size <= 8:
        raise api.InvalidParams("film grain: strength must be in [0, 1] and size in [1, 8]")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    small = (max(1, -(-h // size)), max(1, -(-w // size)))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((*small, 1 if monochrome else 3), dtype=np.float32)
    noise = np.repeat(np.repeat(noise, size, axis=0), size, axis=1)[:h, :w]
    out = np.clip(rgb + noise * strength * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(out)


def film_grain(image: Image.Image, params, context: api.PostprocessContext) -> Image.Image:
    options = context.options
    return add_grain(image, context.seed, float(options["strength"]), int(options["size"]),
                     bool(options["monochrome"]))


@api.hookimpl
def register_postprocessors() -> list[api.PostprocessorSpec]:
    return [api.PostprocessorSpec("film-grain", "Film grain", film_grain, OPTIONS, order=900)]
