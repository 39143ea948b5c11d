"""The X/Y/Z plot script, written against the public plugin API only.

Its controls are declared in A1111 1.10's `ui()` order, so `script_args` from A1111 clients
line up: x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
no_fixed_seeds, margin_size, csv_mode, raw_mode, then Atelier's vary_seeds_x/y/z (named, or
positions 16-18). The 18-argument list of Forge and A1111's later dev branch (vary_seeds_x/y/z
after no_fixed_seeds, no raw_mode) is told apart by its length. Axis types are indexes into A1111's axis
list for the tab (or labels); the built-in axes register through `register_xyz_axes`, as an
extension's would. See docs/extensions.md.
"""
from __future__ import annotations

from typing import Any

from modules.plugins import api

from .axes import builtin_axes
from .plot import TITLE, available_axes, check, fill_values, run


def _axis_options(letter: str, default: str) -> tuple[api.OptionSpec, ...]:
    upper = letter.upper()
    return (
        api.OptionSpec(f"{letter}_type", f"{upper} type", default, "dropdown", infotext=f"{upper} Type"),
        api.OptionSpec(f"{letter}_values", f"{upper} values", "", "text", infotext=f"{upper} Values"),
        api.OptionSpec(f"{letter}_values_dropdown", f"{upper} values (list)", [], "multiselect"),
    )


OPTIONS = (
    *_axis_options("x", "Seed"), *_axis_options("y", "Nothing"), *_axis_options("z", "Nothing"),
    api.OptionSpec("draw_legend", "Draw legend", True, "checkbox"),
    api.OptionSpec("include_lone_images", "Include Sub Images", False, "checkbox"),
    api.OptionSpec("include_sub_grids", "Include Sub Grids", False, "checkbox"),
    api.OptionSpec("no_fixed_seeds", "Keep -1 for seeds", False, "checkbox"),
    api.OptionSpec("margin_size", "Grid margins (px)", 0, "slider", 0, 500, 2),
    api.OptionSpec("csv_mode", "Use text inputs instead of dropdowns", False, "checkbox"),
    api.OptionSpec("raw_mode", "Use raw text lines", False, "checkbox"),
    *(api.OptionSpec(f"vary_seeds_{letter}", f"Vary seeds for {letter.upper()}", False, "checkbox")
      for letter in "xyz"),
)
# Forge's (and A1111 dev's) ui() order: vary_seeds_x/y/z after no_fixed_seeds, and no raw_mode
FORGE_ORDER = (*(o.name for o in OPTIONS[:13]), "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size",
               "csv_mode")


def choices(tab: str, registries: Any) -> dict[str, list[str]]:
    names = available_axes(tab, registries.xyz_axes)
    return {f"{letter}_type": names for letter in "xyz"}


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, check=check, choices=choices, aliases=("X/Y plot",),
                           description="One image per combination of axis values, laid out in a grid.", order=10,
                           fill_buttons=("x_values", "y_values", "z_values"), fill=fill_values,
                           orders=(FORGE_ORDER,))]


@api.hookimpl
def register_xyz_axes(settings: Any) -> list[api.AxisSpec]:
    return builtin_axes(settings)
