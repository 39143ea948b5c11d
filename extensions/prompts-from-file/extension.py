"""Prompts from file or textbox: each non-empty line is one generation.

A line is a prompt, or A1111's flags: `--prompt "a cat" --negative_prompt "blurry" --steps 20
--cfg_scale 6.5 --sampler_name "Euler a" --seed 5 --width 512 --height 768 --sd_model NAME`.
Controls in A1111 1.10's `ui()` order: checkbox_iterate, checkbox_iterate_batch,
prompt_position, prompt_txt. Every line is parsed and checked before the job is queued.
"""
from __future__ import annotations

import dataclasses
import random
import shlex
from typing import Any

from modules.plugins import api

TITLE = "Prompts from file or textbox"
MAX_LINES = 1000
OPTIONS = (
    api.OptionSpec("checkbox_iterate", "Iterate seed every line", False, "checkbox"),
    api.OptionSpec("checkbox_iterate_batch", "Use same random seed for all lines", False, "checkbox"),
    api.OptionSpec("prompt_position", "Insert prompts at the", "start", "dropdown", choices=("start", "end")),
    api.OptionSpec("prompt_txt", "List of prompt inputs", "", "text"),
)
INT_TAGS = ("seed", "subseed", "seed_resize_from_h", "seed_resize_from_w", "batch_size", "n_iter", "steps",
            "width", "height", "sampler_index")
FLOAT_TAGS = ("subseed_strength", "cfg_scale")
TEXT_TAGS = ("sampler_name", "scheduler", "styles", "sd_model", "prompt_for_display")
BOOL_TAGS = ("restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid")
REFUSED_TAGS = ("outpath_samples", "outpath_grids")  # output folders are the server's, never a line's


def _value(tag: str, text: str, line: str) -> Any:
    try:
        if tag in INT_TAGS:
            return int(text)
        if tag in FLOAT_TAGS:
            return float(text)
    except ValueError:
        raise api.InvalidParams(f"Prompts from file: --{tag} needs a number, got {text!r} in line {line!r}") from None
    if tag in BOOL_TAGS:
        return text.lower() == "true"
    return text


def parse_line(line: str) -> dict[str, Any]:
    """A line's flags by name (a line that does not start with `--` is just a prompt)."""
    if not line.lstrip().startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise api.InvalidParams(f"Prompts from file: cannot read line {line!r}: {err}") from None
    found: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        tag = word[2:]
        if not word.startswith("--") or not tag:
            raise api.InvalidParams(f"Prompts from file: expected a --flag, got {word!r} in line {line!r}")
        if pos + 1 >= len(words):
            raise api.InvalidParams(f"Prompts from file: --{tag} has no value in line {line!r}")
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            text = [words[pos]]
            while pos + 1 < len(words) and not words[pos + 1].startswith("--"):
                pos += 1
                text.append(words[pos])
            found[tag] = " ".join(text)
        elif tag in REFUSED_TAGS:
            raise api.InvalidParams(f"Prompts from file: --{tag} is not allowed (outputs go to the server's folders)")
        elif tag in INT_TAGS + FLOAT_TAGS + TEXT_TAGS + BOOL_TAGS:
            pos += 1
            found[tag] = _value(tag, words[pos], line)
        else:
            raise api.InvalidParams(f"Prompts from file: unknown flag --{tag} in line {line!r}")
        pos += 1
    return found


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def line_params(base: Any, flags: dict[str, Any], position: str, registries: Any) -> tuple[Any, str | None]:
    """The job's params with one line's flags applied, and the line's checkpoint (None: the job's)."""
    changes: dict[str, Any] = {}
    for tag, value in flags.items():
        if tag in ("prompt", "negative_prompt"):
            own = getattr(base, tag)
            joined = (f"{value} {own}" if position == "start" else f"{own} {value}") if own else value
            changes[tag] = joined
        elif tag == "restore_faces":
            changes["restore_faces"] = bool(value)
        elif tag == "tiling":
            if value:
                raise api.InvalidParams(f"Prompts from file: --{tag} true is not supported by Atelier yet")
        elif tag == "do_not_save_samples":
            changes["save_images"] = base.save_images and not value
        elif tag == "styles":
            changes["styles"] = tuple(s.strip() for s in value.split(",") if s.strip())
        elif tag == "sampler_index":
            names = registries.samplers.names()
            if not 0 <= value < len(names):
                raise api.InvalidParams(f"Prompts from file: --sampler_index {value} is out of range")
            changes["sampler_name"] = names[value]
        elif tag not in ("sd_model", "do_not_save_grid", "prompt_for_display"):
            changes[tag] = value
    return dataclasses.replace(base, **changes), flags.get("sd_model")


def _checked(ctx: api.ScriptCheck, params: Any, line: str) -> None:
    if params.sampler_name not in ctx.registries.samplers:
        raise api.InvalidParams(f"Prompts from file: unknown sampler {params.sampler_name!r} in line {line!r}. "
                                f"Known: {', '.join(ctx.registries.samplers.names())}")
    scheduler = params.scheduler
    if scheduler.lower() != "automatic" and scheduler not in ctx.registries.schedulers:
        raise api.InvalidParams(f"Prompts from file: unknown schedule type {scheduler!r} in line {line!r}")
    if ctx.limits is not None:
        try:
            params.validate(ctx.limits)
        except api.InvalidParams as err:
            raise api.InvalidParams(f"Prompts from file: line {line!r}: {err}") from None


def check(ctx: api.ScriptCheck) -> None:
    lines = lines_of(ctx.args["prompt_txt"])
    if not lines:
        raise api.InvalidParams("Prompts from file: the list of prompt inputs is empty")
    if len(lines) > MAX_LINES:
        raise api.InvalidParams(f"Prompts from file: {len(lines)} lines; at most {MAX_LINES}")
    for line in lines:
        params, checkpoint = line_params(ctx.params, parse_line(line), ctx.args["prompt_position"], ctx.registries)
        if checkpoint is not None:
            ctx.find_checkpoint(checkpoint)
        _checked(ctx, params, line)
        faces = getattr(ctx.registries, "face_restorers", None)
        if getattr(params, "restore_faces", False) and faces is not None:
            faces.check(params.face_restoration_model, "script_args")  # names the weight files to fetch


def run(ctx: api.ScriptContext) -> api.Result:
    args, base = ctx.args, ctx.params
    jobs = [parse_line(line) for line in lines_of(args["prompt_txt"])]
    seed = base.seed
    if (args["checkbox_iterate"] or args["checkbox_iterate_batch"]) and seed == -1:
        seed = random.randrange(4294967294)
    ctx.begin(len(jobs))
    out = api.Result()
    for flags in jobs:
        if ctx.interrupted:
            out.interrupted = True
            break
        params, checkpoint = line_params(dataclasses.replace(base, seed=seed), flags, args["prompt_position"],
                                         ctx.registries)
        api.extend_result(out, ctx.process(params, checkpoint and ctx.find_checkpoint(checkpoint), "line"))
        if args["checkbox_iterate"]:
            seed += base.batch_size * base.n_iter
    return out


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, check=check, order=30,
                           description="One generation per line, with optional per-line --flags.")]
