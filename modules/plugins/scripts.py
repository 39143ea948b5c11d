"""Scripts: a selectable tool (X/Y/Z plot, prompt matrix, ...) that runs instead of one generation.

A script is a `ScriptSpec` that an extension returns from `register_scripts`. It declares its
controls as data (`OptionSpec`s, in the order of A1111's `ui()` return values, so positional
`script_args` from A1111 clients line up), the tabs it shows in, a `check` that refuses bad
arguments before anything is queued, and a `run` that does the work.

`run(ctx)` executes on the job's worker, inside the job: `ctx.process(params)` runs one
generation on the engine (the same job's interrupt and progress), as many times as the script
wants, optionally on another checkpoint. The job stays one job of one user, so the queue's
fairness, ownership and cancel apply to the whole script run.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules import infotext as infotext_format
from modules.errors import InvalidParams
from modules.plugins.grids import GridOptions
from modules.plugins.specs import OptionSpec

TABS = ("txt2img", "img2img")
DISPLAY_ONLY = ("html",)  # controls that carry no value (A1111's gr.HTML info boxes)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


@dataclass(frozen=True)
class ScriptSpec:
    """A script: `name` is its title as users and A1111 clients see it ("X/Y/Z plot").

    `options` are its controls in A1111's positional order (kinds as `OptionSpec`, plus
    "multiselect" for a list of values and "html" for an information line that takes no value).
    `choices(tab, registries)` may give dropdown choices that depend on the tab and the registries,
    by option name. `check(ctx)` raises InvalidParams naming a bad value before the job is queued;
    `run(ctx)` returns the job's `Result`. The UI draws a "fill values" button beside each text option
    named in `fill_buttons`; `fill(ScriptFill)` returns the text it writes there (None: leave it).
    Buttons carry no value, so positional `script_args` are unchanged. `orders` are other positional
    orders (option names) that clients of A1111 forks send, each told apart by its length.
    """

    name: str
    run: Callable[[Any], Any]
    options: tuple[OptionSpec, ...] = ()
    tabs: tuple[str, ...] = TABS
    check: Callable[[Any], None] | None = None
    choices: Callable[[str, Any], Mapping[str, list[str]]] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    order: int = 100
    fill_buttons: tuple[str, ...] = ()
    fill: Callable[[Any], str | None] | None = None
    orders: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class ScriptFill:
    """What a script's `fill` gets when a "fill values" button is pressed in the UI."""

    task: str
    option: str  # the text option whose button was pressed
    args: Mapping[str, Any]  # the script's current control values by option name
    registries: Any
    checkpoints: tuple[str, ...] = ()  # the checkpoint names the server lists


@dataclass(frozen=True)
class ScriptCheck:
    """What `ScriptSpec.check` gets at submit time: the job's params (input images included) and args."""

    task: str
    params: Any
    args: Mapping[str, Any]
    registries: Any
    find_checkpoint: Callable[[str], str]  # a name as users write it -> the checkpoint's name; raises
    limits: Any = None  # the server's Limits: check a cell's params with `params.validate(limits)`
    interrogation: Callable[[str], None] | None = None

    def check_interrogation(self, model: str) -> None:
        """Raise InvalidParams naming the files when interrogation model `model` ("clip",
        "deepdanbooru" or "wd14") is not installed, so a script that needs it is refused before it is queued."""
        if self.interrogation is not None:
            self.interrogation(model)


@dataclass
class ScriptContext:
    """What `ScriptSpec.run` gets on the worker. Use `process` for every generation."""

    task: str
    params: Any
    args: Mapping[str, Any]
    registries: Any
    checkpoint: str  # the job's checkpoint
    find_checkpoint: Callable[[str], str]
    process_fn: Callable[[Any, str | None, str], Any]
    save_grid_fn: Callable[[Any, int, str], Path | None]
    stop_fn: Callable[[], bool]
    save_fn: Callable[[Any, int, str], Path | None] = lambda image, seed, text: None
    grid: GridOptions = field(default_factory=GridOptions)  # the user's grid options (rows, format, saving)
    interrogate_fn: Callable[[Any, str], str] | None = None
    warnings: list[str] = field(default_factory=list)
    total: int = 1
    done: int = 0

    def begin(self, total: int) -> None:
        """Say how many generations ("cells") the script will run, for the progress line."""
        self.total, self.done = max(int(total), 1), 0

    def process(self, params: Any, checkpoint: str | None = None, label: str = "cell") -> Any:
        """Run one generation (progress shows "cell 3/12"); `checkpoint` switches the model first."""
        self.done += 1
        return self.process_fn(params, checkpoint, f"{label} {self.done}/{self.total}")

    @property
    def interrupted(self) -> bool:
        """True once the user interrupted the job: stop and return what is done."""
        return self.stop_fn()

    def save_grid(self, image: Any, seed: int, infotext: str) -> Path | None:
        """Save a grid to outputs/<task>-grids when the job saves images and `grid_save` is on, in
        `grid_format`, with the infotext unless `enable_pnginfo` is off; returns its path or None."""
        return self.save_grid_fn(image, seed, infotext)

    def save(self, image: Any, seed: int, infotext: str) -> Path | None:
        """Save a finished image (SD upscale's result) with the job's other images, if the job saves."""
        return self.save_fn(image, seed, infotext)

    def interrogate(self, image: Any, model: str) -> str:
        """A prompt for `image`: "clip" (caption and list matches) or "deepdanbooru" (tags), with the
        user's interrogation options, as img2img's Interrogate buttons give it."""
        if self.interrogate_fn is None:
            raise InvalidParams("interrogation is not available to this script run")
        return self.interrogate_fn(image, model)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def script_names(scripts: Any, tab: str) -> list[str]:
    """The names of the scripts that show in `tab`, in their order."""
    return [s.name for s in scripts if tab in s.tabs]


def find_script(scripts: Any, name: str, tab: str) -> ScriptSpec:
    """The script named `name` (any case) for `tab`, or InvalidParams naming the choices."""
    known = script_names(scripts, tab)
    if name in scripts:
        spec = scripts.get(name)
        if tab in spec.tabs:
            return spec
    raise InvalidParams(f"Script {name!r} not found for {tab}. Known: {', '.join(known) or 'none'}",
                        field="script_name")


def script_args(spec: ScriptSpec, args: Any) -> dict[str, Any]:
    """Positional (A1111 `ui()` order) or named arguments -> values by option name, typed by kind.

    Missing trailing arguments take their defaults; extra ones are an error naming the count.
    """
    options = [o for o in spec.options]
    if args is None:
        args = []
    if isinstance(args, Mapping):
        names = {o.name for o in options}
        unknown = sorted(str(k) for k in args if k not in names)
        if unknown:
            raise InvalidParams(f"{spec.name}: unknown script_args {', '.join(unknown)}; "
                                f"known: {', '.join(o.name for o in options)}", field="script_args")
        given = dict(args)
    elif isinstance(args, Sequence) and not isinstance(args, str):
        names = next((order for order in spec.orders if len(order) == len(args)), [o.name for o in options])
        if len(args) > len(names):
            raise InvalidParams(f"{spec.name} takes at most {len(names)} script_args "
                                f"({', '.join(names)}); got {len(args)}", field="script_args")
        given = dict(zip(names, args, strict=False))
    else:
        raise InvalidParams("script_args must be a list (A1111's order) or a mapping by name", field="script_args")
    return {o.name: _coerce(spec.name, o, given[o.name]) if o.name in given else o.default for o in options}


def _coerce(script: str, option: OptionSpec, value: Any) -> Any:
    where = f"{script}: {option.name} ({option.label})"
    if option.kind in DISPLAY_ONLY:
        return None
    if option.kind == "checkbox":
        return _as_bool(where, value)
    if option.kind in ("slider", "number"):
        return _as_number(where, option, value)
    if option.kind == "multiselect":
        if value is None:
            return []
        if isinstance(value, str):
            return [value] if value else []
        if not isinstance(value, Sequence):
            raise InvalidParams(f"{where} must be a list of values, got {value!r}", field="script_args")
        return [str(v) for v in value]
    if option.kind == "dropdown":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidParams(f"{where} must be a choice (text or index), got {value!r}", field="script_args")
        return value
    return "" if value is None else str(value)


def _as_bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidParams(f"{where} must be true or false, got {value!r}", field="script_args")


def _as_number(where: str, option: OptionSpec, value: Any) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidParams(f"{where} must be a number, got {value!r}", field="script_args") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParams(f"{where} must be a number, got {value!r}", field="script_args")
    low = option.minimum if option.minimum is not None else -math.inf
    high = option.maximum if option.maximum is not None else math.inf
    if not low <= value <= high:
        raise InvalidParams(f"{where} must be between {option.minimum} and {option.maximum}, got {value}",
                            field="script_args")
    whole = isinstance(option.default, int) and (option.step is None or float(option.step).is_integer())
    return int(round(value)) if whole else float(value)


def with_infotext_fields(text: str, fields: Mapping[str, Any]) -> str:
    """`text` (an A1111 infotext) with `fields` appended to its parameters line."""
    extra = ", ".join(f"{k}: {infotext_format.quote(v)}" for k, v in fields.items() if v is not None)
    if not extra:
        return text
    return f"{text}, {extra}" if text else extra


def option_choices(spec: ScriptSpec, tab: str, registries: Any) -> dict[str, list[str]]:
    """Each option's choices in `tab`: the declared ones, or the script's `choices` hook."""
    found = {o.name: list(o.choices) for o in spec.options if o.choices}
    if spec.choices is not None:
        found.update({k: list(v) for k, v in spec.choices(tab, registries).items()})
    return found


def script_info(spec: ScriptSpec, tab: str, registries: Any) -> dict[str, Any]:
    """A1111's /sdapi/v1/script-info entry for one script in one tab."""
    choices = option_choices(spec, tab, registries)
    args = []
    for o in spec.options:
        args.append({"label": o.label, "value": o.default, "minimum": o.minimum, "maximum": o.maximum,
                     "step": o.step, "choices": choices.get(o.name)})
    return {"name": spec.name.lower(), "is_alwayson": False, "is_img2img": tab == "img2img", "args": args}


@dataclass(frozen=True)
class AxisSpec:
    """An X/Y/Z plot axis, from `register_xyz_axes` (the built-in axes use the same hook).

    `kind` parses the axis text: "int" and "float" take ranges (`1-5`, `1-5 (+2)`, `1-10 [5]`),
    "str" a comma/CSV list, "permutations" every order of the listed values, "nothing" one empty
    value, "checkpoint" checkpoint names (the cell runs on that model). `apply(params, value, values)`
    returns the cell's params (`dataclasses.replace`); `values` are all the axis's values (Prompt S/R
    replaces the first one). `check(values, ctx)` raises InvalidParams
    naming a bad value before the job is queued. `cost` orders the loops: the costliest axis
    changes least often (checkpoints: 1.0). `choices(registries)` fills the UI's value list.
    """

    name: str
    apply: Callable[[Any, Any, list[Any]], Any]
    kind: str = "str"
    tabs: tuple[str, ...] = TABS
    cost: float = 0.0
    check: Callable[[list[Any], ScriptCheck], None] | None = None
    choices: Callable[[Any], list[str]] | None = None
    format: Callable[[Any], str] | None = None  # a value as the grid legend shows it; None: "Name: value"
    aliases: tuple[str, ...] = ()


RESULT_LISTS = ("images", "infotexts", "seeds", "subseeds", "prompts", "negative_prompts", "paths")


def extend_result(out: Any, result: Any) -> None:
    """Append one generation's images, infotexts, seeds, prompts and paths to a script's `Result`."""
    for name in RESULT_LISTS:
        getattr(out, name).extend(getattr(result, name))
    for warning in result.warnings:
        if warning not in out.warnings:
            out.warnings.append(warning)
    out.interrupted = out.interrupted or result.interrupted
