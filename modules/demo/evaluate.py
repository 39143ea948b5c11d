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
    """Rate of `colour` shapes for prompts that name no shape colour, without and with it as negative."""
    scenes = [s for s in shapes.all_scenes() if s.background != colour]
    random.Random(opts.seed).shuffle(scenes)
    prompts = [shapes.caption(s, 0, frozenset({"size", "colour"})) for s in scenes[:count]]
    rates = {}
    for negative in ("", colour):
        found = total = 0
        for i, prompt in enumerate(prompts):
            for image in _txt2img(engine, opts, prompt, per_prompt, 7.0, opts.seed + 100 * i, negative):
                found += classify(image).colour == colour
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


def square_mask(size: int, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A white centred square on black, and its box (left, top, right, bottom)."""
    lo = (size - side) // 2
    box = (lo, lo, lo + side, lo + side)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask, box


def inpaint_green(engine, count: int, opts: EvalOptions, margin: int = 8) -> dict[str, float]:
    """Inpaint a centred square with 'a green square': green share inside, change outside (0-255)."""
    from modules.pipeline.params import Img2ImgParams

    scenes = [s for s in shapes.all_scenes() if s.position not in ("centre", "top", "bottom", "left", "right")
              and "green" not in (s.colour, s.background)]
    random.Random(opts.seed + 1).shuffle(scenes)
    mask, box = square_mask(opts.size, opts.size * 3 // 8)
    green, change = [], []
    for i, scene in enumerate(scenes[:count]):
        source = _render(scene, opts.size)
        params = Img2ImgParams(prompt="a green square", init_images=(source,), mask=mask, denoising_strength=1.0,
                               inpainting_fill=1, steps=opts.steps, sampler_name=opts.sampler,
                               seed=opts.seed + i, width=opts.size, height=opts.size, save_images=False)
        out = np.asarray(engine.img2img(params).images[0].convert("RGB"), dtype=np.float32)
        left, top, right, bottom = box
        inside = out[top:bottom, left:right].reshape(-1, 3)
        green.append(float(np.mean([nearest_colour(p) == "green" for p in inside])))
        keep = np.ones(out.shape[:2], dtype=bool)
        keep[max(top - margin, 0):bottom + margin, max(left - margin, 0):right + margin] = False
        change.append(float(np.abs(out - np.asarray(source, dtype=np.float32))[keep].mean()))
    return {"green_share_inside": float(np.mean(green)), "mean_change_outside": float(np.mean(change))}
