"""The X/Y/Z plot: parse the three axes, run one generation per cell, and lay the cells out in grids."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from modules.plugins import api

from .assemble import assemble
from .axes import A1111_AXES
from .values import float_values, int_values, join_values, permutation_values, split_values

TITLE = "X/Y/Z plot"
LETTERS = ("x", "y", "z")
MAX_CELLS = 1000
MAX_GRID_MEGAPIXELS = 200  # A1111's img_max_size_mp default
SEED_AXES = ("Seed", "Var. seed")


@dataclass
class Axis:
    """One parsed axis: its spec, its values and the text they came from."""

    letter: str
    spec: api.AxisSpec
    values: list[Any]
    text: str  # what the user wrote, for the infotext

    @property
    def active(self) -> bool:
        return self.spec.kind != "nothing"

    def label(self, value: Any) -> str:
        if not self.active:
            return ""
        if self.spec.format is not None:
            return self.spec.format(value)
        shown = round(value, 8) if isinstance(value, float) else value
        return f"{self.spec.name}: {shown}"


def axis_names(tab: str, registry: Any) -> list[str]:
    """Axis labels by index as API clients count them: A1111's list, then extension axes."""
    builtin = A1111_AXES[tab]
    return [*builtin, *(s.name for s in registry if tab in s.tabs and s.name not in builtin)]


def available_axes(tab: str, registry: Any) -> list[str]:
    """The axes Atelier can plot in `tab` (for the UI's dropdowns)."""
    return [n for n in axis_names(tab, registry) if n in registry and tab in registry.get(n).tabs]


def resolve_axis(choice: Any, tab: str, registry: Any, letter: str) -> api.AxisSpec:
    """An axis from an index into A1111's list (API clients) or its label (the UI, named args)."""
    where = f"X/Y/Z plot {letter.upper()} type"
    name = str(choice).strip()
    if isinstance(choice, int) or name.isdigit():
        names = axis_names(tab, registry)
        index = int(name)
        if not 0 <= index < len(names):
            raise api.InvalidParams(f"{where}: index {index} is out of range (0-{len(names) - 1})")
        name = names[index]
    if name not in registry or tab not in registry.get(name).tabs:
        raise api.InvalidParams(f"{where}: the axis {name!r} is not available in Atelier's {tab} "
                                f"(available: {', '.join(available_axes(tab, registry))})")
    return registry.get(name)


def fill_values(fill: api.ScriptFill) -> str | None:
    """A1111's fill button: every value of the axis chosen for this letter, as the values text."""
    letter = fill.option[0]
    try:
        spec = resolve_axis(fill.args.get(f"{letter}_type", "Nothing"), fill.task, fill.registries.xyz_axes, letter)
    except api.InvalidParams:
        return None
    if spec.kind == "checkpoint":
        values = list(fill.checkpoints)
    elif spec.name == "Refiner checkpoint":
        values = ["None", *fill.checkpoints]
    elif spec.choices is not None:
        values = list(spec.choices(fill.registries))
    else:
        return None
    return join_values(values) if values else None


def parse_values(spec: api.AxisSpec, text: str, dropdown: list[str], raw: bool, where: str) -> list[Any]:
    if spec.kind == "nothing":
        return [None]
    items = list(dropdown) if dropdown else split_values(text, raw)
    if not items:
        raise api.InvalidParams(f"{where}: give at least one value")
    if spec.kind == "int":
        return int_values(items, where)
    if spec.kind == "float":
        return float_values(items, where)
    if spec.kind == "permutations":
        return permutation_values(items, where)
    return items


def parse_axes(args: dict[str, Any], tab: str, registries: Any) -> list[Axis]:
    axes = []
    for letter in LETTERS:
        spec = resolve_axis(args[f"{letter}_type"], tab, registries.xyz_axes, letter)
        where = f"X/Y/Z plot {letter.upper()} axis ({spec.name})"
        dropdown = [] if args.get("csv_mode") else list(args.get(f"{letter}_values_dropdown") or [])
        text = str(args.get(f"{letter}_values") or "")
        values = parse_values(spec, text, dropdown, bool(args.get("raw_mode")), where)
        axes.append(Axis(letter, spec, values, join_values(dropdown) if dropdown else text))
    return axes


def check(ctx: api.ScriptCheck) -> None:
    """Every axis value is parsed, named and tried on the job's params before anything is queued."""
    axes = parse_axes(dict(ctx.args), ctx.task, ctx.registries)
    count = len(axes[0].values) * len(axes[1].values) * len(axes[2].values)
    if count > MAX_CELLS:
        raise api.InvalidParams(f"X/Y/Z plot: {count} cells; at most {MAX_CELLS}")
    for axis in axes:
        where = f"X/Y/Z plot {axis.letter.upper()} axis ({axis.spec.name})"
        if axis.spec.kind == "checkpoint":
            for value in axis.values:
                ctx.find_checkpoint(value)
        if axis.spec.check is not None:
            axis.spec.check(axis.values, ctx)
        if not axis.active or axis.spec.kind == "checkpoint":
            continue
        for value in axis.values:
            try:
                cell = axis.spec.apply(ctx.params, value, axis.values)
                if ctx.limits is not None:
                    cell.validate(ctx.limits)
            except api.InvalidParams as err:
                raise api.InvalidParams(f"{where} value {value!r}: {err}") from None
    pixels = count * ctx.params.width * ctx.params.height
    if pixels / 1e6 > MAX_GRID_MEGAPIXELS:
        raise api.InvalidParams(f"X/Y/Z plot: the grid would be {pixels / 1e6:.0f} megapixels; "
                                f"at most {MAX_GRID_MEGAPIXELS}")


def _random_seed() -> int:
    return random.randrange(4294967294)


def fix_seeds(params: Any, axes: list[Axis]) -> Any:
    """-1 seeds become fixed random ones, so every cell shares them (unless "Keep -1 for seeds")."""
    for axis in axes:
        if axis.spec.name in SEED_AXES:
            axis.values = [_random_seed() if v in (None, -1) else v for v in axis.values]
    return dataclasses.replace(params, seed=_random_seed() if params.seed == -1 else params.seed,
                               subseed=_random_seed() if params.subseed == -1 else params.subseed)


def vary_seed(params: Any, index: tuple[int, int, int], axes: list[Axis], args: dict[str, Any]) -> Any:
    """"Vary seeds for X/Y/Z": the cell's seed plus its position along the chosen axes, counted
    x fastest (a random -1 seed stays -1)."""
    if params.seed == -1:
        return params
    offset, stride = 0, 1
    for axis, i in zip(axes, index, strict=True):
        if args.get(f"vary_seeds_{axis.letter}"):
            offset += i * stride
            stride *= len(axis.values)
    return dataclasses.replace(params, seed=params.seed + offset) if offset else params


def loop_order(axes: list[Axis]) -> list[tuple[int, int, int]]:
    """Cell indexes (ix, iy, iz) with the costliest axis outermost (z, then y, on ties), so a
    checkpoint axis loads each model once."""
    rank = sorted(range(3), key=lambda i: (axes[i].spec.cost, i), reverse=True)
    sizes = [len(a.values) for a in axes]
    order = []
    for a in range(sizes[rank[0]]):
        for b in range(sizes[rank[1]]):
            for c in range(sizes[rank[2]]):
                index = [0, 0, 0]
                index[rank[0]], index[rank[1]], index[rank[2]] = a, b, c
                order.append(tuple(index))
    return order


def run(ctx: api.ScriptContext) -> api.Result:
    args = dict(ctx.args)
    axes = parse_axes(args, ctx.task, ctx.registries)
    params = ctx.params if args.get("no_fixed_seeds") else fix_seeds(ctx.params, axes)
    for axis in axes:
        if axis.spec.kind == "checkpoint":
            axis.values = [ctx.find_checkpoint(v) for v in axis.values]
    order = loop_order(axes)
    ctx.begin(len(order))
    cells: dict[tuple[int, int, int], api.Result] = {}
    for index in order:
        if ctx.interrupted:
            break
        cell, checkpoint = params, None
        for axis, i in zip(axes, index, strict=True):
            value = axis.values[i]
            if axis.spec.kind == "checkpoint":
                checkpoint = value
            elif axis.active:
                cell = axis.spec.apply(cell, value, axis.values)
        cells[index] = ctx.process(vary_seed(cell, index, axes, args), checkpoint)
    return assemble(ctx, axes, cells, args)
