"""Lay the X/Y/Z cells out: one grid per Z value, those side by side under Z titles, then the cells."""
from __future__ import annotations

from typing import Any

from PIL import Image

from modules.plugins import api

SEED_AXES = ("Seed", "Var. seed")


def grid_fields(axes: list[Any], letters: tuple[str, ...], fixed_seeds: bool) -> dict[str, Any]:
    """A1111's grid infotext fields: Script, X Type, X Values (and Fixed X Values for seed axes)."""
    fields: dict[str, Any] = {"Script": "X/Y/Z plot"}
    for axis in axes:
        if axis.letter not in letters or not axis.active:
            continue
        name = axis.letter.upper()
        fields[f"{name} Type"] = axis.spec.name
        fields[f"{name} Values"] = axis.text
        if axis.spec.name in SEED_AXES and fixed_seeds:
            fields[f"Fixed {name} Values"] = ", ".join(str(v) for v in axis.values)
    return fields


def _texts(labels: list[str]) -> list[list[api.GridAnnotation]]:
    return [[api.GridAnnotation(label)] for label in labels]


def _sub_grid(axes: list[Any], cells: dict, iz: int, size: tuple[int, int], args: dict) -> Image.Image:
    x, y = axes[0], axes[1]
    images = []
    for iy in range(len(y.values)):
        for ix in range(len(x.values)):
            result = cells.get((ix, iy, iz))
            images.append(result.images[0] if result is not None and result.images else Image.new("RGB", size))
    grid = api.image_grid(images, rows=len(y.values))
    if args.get("draw_legend"):
        grid = api.annotate_grid(grid, size[0], size[1], _texts([x.label(v) for v in x.values]),
                                 _texts([y.label(v) for v in y.values]), int(args.get("margin_size") or 0))
    return grid


def _first(cells: dict, keys: list[tuple[int, int, int]]) -> Any:
    for key in keys:
        result = cells.get(key)
        if result is not None and result.images:
            return result
    return None


def assemble(ctx: api.ScriptContext, axes: list[Any], cells: dict, args: dict) -> api.Result:
    """The job's Result: the grid first (saved to <task>-grids), sub-grids and cells as the options ask."""
    z = axes[2]
    ordered = sorted(cells, key=lambda k: (k[2], k[1], k[0]))
    first = _first(cells, ordered)
    out = api.Result(interrupted=ctx.interrupted or any(r.interrupted for r in cells.values()))
    if first is None:
        out.warnings.append("X/Y/Z plot: no cell produced an image")
        return out
    size = first.images[0].size
    subs = [_sub_grid(axes, cells, iz, size, args) for iz in range(len(z.values))]
    grid = api.image_grid(subs, rows=1)
    if args.get("draw_legend") and z.active:
        grid = api.annotate_grid(grid, subs[0].width, subs[0].height, _texts([z.label(v) for v in z.values]),
                                 [[api.GridAnnotation()]])
    fixed = not args.get("no_fixed_seeds")
    text = api.with_infotext_fields(first.infotexts[0] if first.infotexts else "", grid_fields(axes, "xyz", fixed))
    _add(ctx, out, grid, text, first, save=True)
    if args.get("include_sub_grids") and len(subs) > 1:
        for iz, sub in enumerate(subs):
            cell = _first(cells, [k for k in ordered if k[2] == iz]) or first
            sub_text = api.with_infotext_fields(cell.infotexts[0] if cell.infotexts else "",
                                                grid_fields(axes, "xy", fixed))
            _add(ctx, out, sub, sub_text, cell, save=True)
    if args.get("include_lone_images"):
        for key in ordered:
            api.extend_result(out, cells[key])
    return out


def _add(ctx: api.ScriptContext, out: api.Result, image: Image.Image, text: str, like: api.Result,
         save: bool) -> None:
    seed = like.seeds[0] if like.seeds else 0
    out.images.append(image)
    out.infotexts.append(text)
    out.seeds.append(seed)
    out.subseeds.append(like.subseeds[0] if like.subseeds else 0)
    out.prompts.append(like.prompts[0] if like.prompts else "")
    out.negative_prompts.append(like.negative_prompts[0] if like.negative_prompts else "")
    path = ctx.save_grid(image, seed, text) if save else None
    if path is not None:
        out.paths.append(path)
    for warning in like.warnings:
        if warning not in out.warnings:
            out.warnings.append(warning)
