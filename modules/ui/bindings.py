"""Widgets bound to params fields by name: no positional argument lists anywhere in the UI.

Handlers take `inputs=set(fields.values())`, so Gradio passes one dict {component: value};
`Fields.read` turns it into {field name: value}, coerced to the params field's type.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from modules.errors import InvalidParams

# A1111 infotext key -> params field (PNG info, "read parameters", send-to).
INFOTEXT_FIELDS: Mapping[str, str] = MappingProxyType({
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width",
    "Size-2": "height", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h",
    "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale",
    "Hires steps": "hr_second_pass_steps", "Hires upscaler": "hr_upscaler", "Hires resize-1": "hr_resize_x",
    "Hires resize-2": "hr_resize_y", "Hires sampler": "hr_sampler_name", "Hires schedule type": "hr_scheduler",
    "Hires prompt": "hr_prompt", "Hires negative prompt": "hr_negative_prompt", "Mask blur": "mask_blur",
    "Tiling": "tiling",
    "Distilled CFG Scale": "distilled_cfg_scale", "Shift": "shift",
    "Face restoration": "face_restoration_model",
    "Refiner": "refiner_checkpoint", "Refiner switch at": "refiner_switch_at",
})
SAME_AS_FIRST_PASS = ("Use same sampler", "Use same scheduler", "Use same checkpoint")


class Fields(dict):
    """Components keyed by params field name (plus a few UI-only names such as "styles")."""

    def read(self, data: dict, kind_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """{component: value} from Gradio -> {field name: value}, coerced to the defaults' types."""
        defaults = kind_defaults or {}
        values = {}
        for name, component in self.items():
            if component in data:
                values[name] = coerce(name, data[component], defaults.get(name))
        return values

    def updates(self, values: dict[str, Any]) -> dict:
        """{field name: value} -> {component: value} for the fields this tab has."""
        return {self[name]: value for name, value in values.items() if name in self}


def field_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def coerce(name: str, value: Any, default: Any) -> Any:
    """A widget value as the params field wants it (Gradio numbers arrive as floats)."""
    if value is None or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        return bool(value)
    try:
        if isinstance(default, int):
            number = float(value)
            if number != int(number):
                raise InvalidParams(f"{name} must be a whole number, got {value}")
            return int(number)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise InvalidParams(f"{name} must be a number, got {value!r}") from None
    return value


def values_from_infotext(parsed: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A parsed infotext -> {field name: value} (typed like the params defaults)."""
    values: dict[str, Any] = {}
    for key, name in INFOTEXT_FIELDS.items():
        if key not in parsed or name not in defaults and name not in ("denoising_strength",):
            continue
        value = parsed[key]
        if value in SAME_AS_FIRST_PASS:
            value = None
        try:
            values[name] = coerce(name, value, defaults.get(name))
        except InvalidParams:
            continue
    if "hr_resize_x" in values and values["hr_resize_x"] == 0 and "Hires upscale" not in parsed:
        values.pop("hr_resize_x"), values.pop("hr_resize_y", None)
    if "enable_hr" in defaults:
        values["enable_hr"] = any(k in parsed for k in ("Hires upscale", "Hires upscaler", "Hires steps"))
    if "restore_faces" in defaults:
        values["restore_faces"] = "Face restoration" in parsed
    return values
