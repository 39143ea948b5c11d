"""The Prompt matrix script: `a cat|in a hat|sleeping` makes one image per combination of the parts
after the first, laid out with the parts as row and column legends (left-out parts struck through).

Controls in A1111 1.10's `ui()` order: put_at_start, different_seeds, prompt_type,
variations_delimiter, margin_size.
"""
from __future__ import annotations

import dataclasses
import math
import random

from modules.plugins import api

TITLE = "Prompt matrix"
MAX_PARTS = 9  # 256 images
OPTIONS = (
    api.OptionSpec("put_at_start", "Set at prompt start", False, "checkbox"),
    api.OptionSpec("different_seeds", "Random seeds", False, "checkbox"),
    api.OptionSpec("prompt_type", "Prompt type", "positive", "dropdown", choices=("positive", "negative")),
    api.OptionSpec("variations_delimiter", "Joining char", "comma", "dropdown", choices=("comma", "space")),
    api.OptionSpec("margin_size", "Grid margins", 0, "slider", 0, 500, 2),
)


def matrix_prompts(prompt: str, put_at_start: bool, delimiter: str) -> tuple[list[str], list[str]]:
    """(the parts, one prompt per combination): combination n holds part k+1 when bit k of n is set."""
    parts = prompt.split("|")
    prompts = []
    for n in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for k, text in enumerate(parts[1:]) if n & (1 << k)]
        ordered = [*chosen, parts[0]] if put_at_start else [parts[0], *chosen]
        prompts.append(delimiter.join(ordered))
    return parts, prompts


def legends(parts: list[str]) -> tuple[list, list]:
    """Column and row legends: the first half of the variable parts across, the rest down."""
    variable = parts[1:]
    half = math.ceil(len(variable) / 2)
    across, down = variable[:half], variable[half:]

    def texts(names: list[str]) -> list[list[api.GridAnnotation]]:
        return [[api.GridAnnotation(name, bool(pos & (1 << k))) for k, name in enumerate(names)]
                for pos in range(1 << len(names))]

    return texts(across), texts(down)


def _source(ctx) -> str:
    p = ctx.params
    return p.prompt if ctx.args["prompt_type"] == "positive" else p.negative_prompt


def check(ctx: api.ScriptCheck) -> None:
    for name, allowed in (("prompt_type", ("positive", "negative")), ("variations_delimiter", ("comma", "space"))):
        if ctx.args[name] not in allowed:
            raise api.InvalidParams(f"Prompt matrix: {name} must be {' or '.join(allowed)}, got {ctx.args[name]!r}")
    count = _source(ctx).count("|")
    if count == 0:
        raise api.InvalidParams("Prompt matrix: the prompt has no '|'; write it as 'base|part one|part two'")
    if count > MAX_PARTS:
        raise api.InvalidParams(f"Prompt matrix: {count} '|' parts make {2 ** count} images; at most {MAX_PARTS}")


def run(ctx: api.ScriptContext) -> api.Result:
    args, p = ctx.args, ctx.params
    seed = random.randrange(4294967294) if p.seed == -1 else p.seed
    delimiter = ", " if args["variations_delimiter"] == "comma" else " "
    parts, prompts = matrix_prompts(_source(ctx), args["put_at_start"], delimiter)
    field = "prompt" if args["prompt_type"] == "positive" else "negative_prompt"
    ctx.begin(len(prompts))
    out = api.Result()
    for i, prompt in enumerate(prompts):
        if ctx.interrupted:
            out.interrupted = True
            break
        cell = dataclasses.replace(p, **{field: prompt}, seed=seed + (i if args["different_seeds"] else 0),
                                   batch_size=1, n_iter=1)
        api.extend_result(out, ctx.process(cell))
    if len(out.images) != len(prompts):
        return out
    grid = api.image_grid(out.images, rows=1 << ((len(parts) - 1) // 2))
    across, down = legends(parts)
    width, height = out.images[0].size
    grid = api.annotate_grid(grid, width, height, across, down, int(args["margin_size"]))
    text = api.with_infotext_fields(out.infotexts[0], {"Script": TITLE})
    path = ctx.save_grid(grid, out.seeds[0], text)
    out.images.insert(0, grid)
    for name, value in (("infotexts", text), ("seeds", out.seeds[0]), ("subseeds", out.subseeds[0]),
                        ("prompts", p.prompt), ("negative_prompts", p.negative_prompt)):
        getattr(out, name).insert(0, value)
    out.paths = [path, *out.paths] if path is not None else []
    return out


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, check=check, order=20,
                           description="One image per combination of the prompt's |-separated parts.")]
