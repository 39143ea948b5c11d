"""Loopback (img2img): each result becomes the next loop's init image; the denoising strength moves
from the job's value to the final one along a curve. Controls in A1111 1.10's `ui()` order:
loops, final_denoising_strength, denoising_curve, append_interrogation. With an interrogation chosen,
each loop's prompt is the job's prompt, ", ", then the interrogation of that loop's init image (A1111's).
"""
from __future__ import annotations

import dataclasses
import math
import random

from modules.plugins import api

TITLE = "Loopback"
CURVES = ("Aggressive", "Linear", "Lazy")
INTERROGATIONS = {"None": None, "CLIP": "clip", "DeepBooru": "deepdanbooru", "WD14": "wd14"}  # choice -> interrogation model
OPTIONS = (
    api.OptionSpec("loops", "Loops", 4, "slider", 1, 32, 1),
    api.OptionSpec("final_denoising_strength", "Final denoising strength", 0.5, "slider", 0.0, 1.0, 0.01),
    api.OptionSpec("denoising_curve", "Denoising strength curve", "Linear", "dropdown", choices=CURVES),
    api.OptionSpec("append_interrogation", "Append interrogated prompt at each iteration", "None", "dropdown",
                   choices=tuple(INTERROGATIONS)),
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
    choice = ctx.args["append_interrogation"]
    if choice not in INTERROGATIONS:
        raise api.InvalidParams(f"Loopback: append_interrogation must be one of {', '.join(INTERROGATIONS)}, "
                                f"got {choice!r}")
    if INTERROGATIONS[choice] is not None:
        try:
            ctx.check_interrogation(INTERROGATIONS[choice])
        except api.InvalidParams as err:
            raise api.InvalidParams(f"Loopback: append_interrogation {choice}: {err}") from None


def prompt_for(ctx: api.ScriptContext, image, prompt: str) -> str:
    """The loop's prompt: with an interrogation chosen, "<job prompt>, <interrogation of image>"."""
    model = INTERROGATIONS[ctx.args["append_interrogation"]]
    if model is None:
        return prompt
    text = ctx.interrogate(image, model)
    return f"{prompt}, {text}" if prompt else text


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
                                       denoising_strength=denoise, inpainting_fill=fill,
                                       prompt=prompt_for(ctx, init[0], p.prompt))
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
