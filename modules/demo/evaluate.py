"""Prompt adherence of the demo model, measured through the engine and read back by pixel analysis.

Every measurement runs ordinary engine jobs (txt2img, img2img, inpainting) on the loaded model,
so it tests the engine as much as the model. `tools/eval_demo_model.py` is the command line.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from modules.demo import DEMO_RESOLUTION, shapes
from modules.demo.classify import classify, nearest_colour

ATTRIBUTES = ("background", "colour", "shape", "position")
TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.80, "position": 0.80}


@dataclass(frozen=True)
class EvalOptions:
    steps: int = 20
    seed: int = 1000
    size: int = DEMO_RESOLUTION
    sampler: str = "DPM++ 2M"


def held_out_prompts(count: int, seed: int = 0) -> list[tuple[str, shapes.Scene]]:
    """`count` held-out combinations (never trained on), each with a caption in a rotating phrasing."""
    scenes = shapes.all_scenes(held_out=True)
    random.Random(seed).shuffle(scenes)
    return [(shapes.caption(s, i % 5, frozenset({"size"})), s) for i, s in enumerate(scenes[:count])]


def _txt2img(engine, opts: EvalOptions, prompt: str, n: int, cfg_scale: float, seed: int,
             negative: str = "") -> list[Image.Image]:
    from modules.pipeline.params import Txt2ImgParams

    params = Txt2ImgParams(prompt=prompt, negative_prompt=negative, steps=opts.steps, sampler_name=opts.sampler,
                           cfg_scale=cfg_scale, seed=seed, width=opts.size, height=opts.size, batch_size=n,
                           save_images=False)
    return engine.txt2img(params).images


def adherence(engine, prompts: Sequence[tuple[str, shapes.Scene]], per_prompt: int, cfg_scale: float,
              opts: EvalOptions) -> dict[str, float]:
    """Share of images whose classified attribute matches the prompt, per attribute (and 'all')."""
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    total = 0
    for i, (prompt, scene) in enumerate(prompts):
        for image in _txt2img(engine, opts, prompt, per_prompt, cfg_scale, opts.seed + 100 * i):
            reading = classify(image)
            ok = [getattr(reading, a) == getattr(scene, a) for a in ATTRIBUTES]
            for a, good in zip(ATTRIBUTES, ok, strict=True):
                hits[a] += good
            hits["all"] += all(ok)
            total += 1
    return {a: hits[a] / max(total, 1) for a in hits}


def negative_prompt_effect(engine, count: int, per_prompt: int, opts: EvalOptions,
                           colour: str = "red") -> dict[str, float]:
    """Share of images showing `colour` (as shape or background) for prompts that name no colour,
    without and with `colour` as the negative prompt."""
    scenes = shapes.all_scenes()
    random.Random(opts.seed).shuffle(scenes)
    prompts = [shapes.caption(s, i % 5, frozenset({"size", "colour", "background"}))
               for i, s in enumerate(scenes[:count])]
    rates = {}
    for negative in ("", colour):
        found = total = 0
        for i, prompt in enumerate(prompts):
            for image in _txt2img(engine, opts, prompt, per_prompt, 7.0, opts.seed + 100 * i, negative):
                reading = classify(image)
                found += colour in (reading.colour, reading.background)
                total += 1
        rates["with_negative" if negative else "without_negative"] = found / max(total, 1)
    return rates


def img2img_keeps(engine, count: int, opts: EvalOptions, strength: float = 0.3) -> dict[str, float]:
    """img2img of rendered held-out scenes with their own caption: shape and position kept."""
    from modules.pipeline.params import Img2ImgParams

    kept = {"shape": 0, "position": 0, "both": 0}
    items = held_out_prompts(count, seed=7)
    for i, (prompt, scene) in enumerate(items):
        source = _render(scene, opts.size)
        params = Img2ImgParams(prompt=prompt, init_images=(source,), denoising_strength=strength,
                               steps=opts.steps, sampler_name=opts.sampler, seed=opts.seed + i,
                               width=opts.size, height=opts.size, save_images=False)
        reading = classify(engine.img2img(params).images[0])
        shape_ok, pos_ok = reading.shape == scene.shape, reading.position == scene.position
        kept["shape"] += shape_ok
        kept["position"] += pos_ok
        kept["both"] += shape_ok and pos_ok
    return {k: v / max(len(items), 1) for k, v in kept.items()}


def _render(scene: shapes.Scene, size: int) -> Image.Image:
    from modules.pipeline.latents import to_pil

    return to_pil(shapes.render([scene], size))[0]


def shape_box(scene: shapes.Scene, size: int) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) of a rendered square (no position jitter)."""
    col, row = shapes.POSITIONS[scene.position]
    half = shapes.SQUARE_HALF_SIDE * shapes.SIZES[scene.size] * size
    cx, cy = shapes.GRID[col] * size, shapes.GRID[row] * size
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def inpaint_green(engine, count: int, opts: EvalOptions, margin: int = 8) -> dict[str, float]:
    """Mask the square of a rendered scene and inpaint it with "a green square" (whole picture,
    original content under the mask, denoising 1.0).

    Returns the green share of the masked pixels, and the mean change (0-255) outside the mask
    and a `margin` around it (mask blur reaches a few pixels out).
    """
    from modules.pipeline.params import Img2ImgParams

    scenes = [s for s in shapes.all_scenes() if s.shape == "square" and "green" not in (s.colour, s.background)]
    random.Random(opts.seed + 1).shuffle(scenes)
    green, change = [], []
    for i, scene in enumerate(scenes[:count]):
        source = _render(scene, opts.size)
        left, top, right, bottom = shape_box(scene, opts.size)
        mask = Image.new("L", (opts.size, opts.size), 0)
        mask.paste(255, (left, top, right, bottom))
        params = Img2ImgParams(prompt="a green square", init_images=(source,), mask=mask, denoising_strength=1.0,
                               inpainting_fill=1, inpaint_full_res=False, steps=opts.steps, sampler_name=opts.sampler,
                               seed=opts.seed + i, width=opts.size, height=opts.size, save_images=False)
        out = np.asarray(engine.img2img(params).images[0].convert("RGB"), dtype=np.float32)
        inside = out[top:bottom, left:right].reshape(-1, 3)
        green.append(float(np.mean([nearest_colour(p) == "green" for p in inside])))
        keep = np.ones(out.shape[:2], dtype=bool)
        keep[max(top - margin, 0):bottom + margin, max(left - margin, 0):right + margin] = False
        change.append(float(np.abs(out - np.asarray(source, dtype=np.float32))[keep].mean()))
    return {"green_share_inside": float(np.mean(green)), "mean_change_outside": float(np.mean(change))}
