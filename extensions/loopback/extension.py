"""Loopback (img2img): each result becomes the next loop's init image; the denoising strength moves
from the job's value to the final one along a curve. Controls in A1111 1.10's `ui()` order:
loops, final_denoising_strength, denoising_curve, append_interrogation (only "None": Atelier has
no interrogator yet).
"""
from __future__ import annotations

import dataclasses
import math
import random

from modules.plugins import api

TITLE = "Loopback"
CURVES = ("Aggressive", "Linear", "Lazy")
OPTIONS = (
    api.OptionSpec("loops", "Loops", 4, "slider", 1, 32, 1),
    api.OptionSpec("final_denoising_strength", "Final denoising strength", 0.5, "slider", 0.0, 1.0, 0.01),
    api.OptionSpec("denoising_curve", "Denoising strength curve", "Linear", "dropdown", choices=CURVES),
    api.OptionSpec("append_interrogation", "Append interrogated prompt at each iteration", "None", "dropdown",
                   choices=("None", "CLIP", "DeepBooru")),
)


def strength(loop: int, loops: int, start: float, final: float, curve: str) -> float:
    """The denoising strength of loop `loop` (0 is the job's own)."""
    if loops == 1:
        return start
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        shaped = math.sin(progress * math.pi * 0.5)
    elif curve == "Lazy":
        shaped = 1 - math.cos(progress * math.pi * 0.5)
    else:
        shaped = progress
    return start + (final - start) * shaped


def check(ctx: api.ScriptCheck) -> None:
    if ctx.args["denoising_curve"] not in CURVES:
        raise api.InvalidParams(f"Loopback: denoising_curve must be one of {', '.join(CURVES)}, "
                                f"got {ctx.args['denoising_curve']!r}")
    if ctx.args["append_interrogation"] != "None":
        raise api.InvalidParams(f"Loopback: append_interrogation {ctx.args['append_interrogation']!r} is not "
                                "supported by Atelier yet (no interrogator); use None")


def run(ctx: api.ScriptContext) -> api.Result:
    p, args = ctx.params, ctx.args
    loops, batches = int(args["loops"]), p.n_iter
    seed = random.randrange(4294967294) if p.seed == -1 else p.seed
    ctx.begin(loops * batches)
    history, out = [], api.Result()
    for _ in range(batches):
        init, fill, last = p.init_images[:1], p.inpainting_fill, None
        for i in range(loops):
            if ctx.interrupted:
                out.interrupted = True
                break
            denoise = strength(i, loops, p.denoising_strength, float(args["final_denoising_strength"]),
                               args["denoising_curve"])
            cell = dataclasses.replace(p, init_images=tuple(init), batch_size=1, n_iter=1, seed=seed,
                                       denoising_strength=denoise, inpainting_fill=fill)
            result = ctx.process(cell, label="loop")
            if not result.images:
                break
            seed = result.seeds[0] + 1
            last, init, fill = result, result.images[:1], 1  # later loops keep the masked content ("original")
            if batches == 1:
                history.append(result)
        if batches > 1 and last is not None and not out.interrupted:
            history.append(last)
        if out.interrupted:
            break
    for result in history:
        api.extend_result(out, result)
    if len(history) > 1:
        grid = api.image_grid([r.images[0] for r in history], rows=1)
        text = api.with_infotext_fields(history[0].infotexts[0], {
            "Final denoising strength": args["final_denoising_strength"], "Denoising curve": args["denoising_curve"]})
        path = ctx.save_grid(grid, history[0].seeds[0], text)
        out.images.insert(0, grid)
        out.infotexts.insert(0, text)
        out.seeds.insert(0, history[0].seeds[0])
        out.subseeds.insert(0, history[0].subseeds[0] if history[0].subseeds else 0)
        out.prompts.insert(0, p.prompt)
        out.negative_prompts.insert(0, p.negative_prompt)
        out.paths = [path, *out.paths] if path is not None else []
    return out


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, tabs=("img2img",), check=check, order=50,
                           description="img2img on each result in turn, with a denoising curve.")]
