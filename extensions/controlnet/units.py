"""ControlNet units as sd-webui-controlnet's API takes them: named fields or the older positional form.

Field names, defaults and enum names follow sd-webui-controlnet's `ControlNetUnit`
(`external_code` / `internal_controlnet/args.py`): resize mode "Just Resize" (0),
"Crop and Resize" (1, the default), "Resize and Fill" (2); control mode "Balanced" (0),
"My prompt is more important" (1), "ControlNet is more important" (2).
"""
from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from PIL import Image

from modules.plugins import api

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": 1, "Outer Fit (Shrink to Fit)": 2, "Scale to Fit (Inner Fit)": 1,
                   "Envelope (Outer Fit)": 2, "RESIZE": 0, "INNER_FIT": 1, "OUTER_FIT": 2}
_CONTROL_ALIASES = {"BALANCED": 0, "PROMPT": 1, "CONTROL": 2}
_FIELD_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
# The older positional form (A1111 script args): the order sd-webui-controlnet's UI group used.
POSITIONAL = ("enabled", "module", "model", "weight", "image", "resize_mode", "low_vram", "processor_res",
              "threshold_a", "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")


@dataclass(frozen=True)
class Unit:
    """One ControlNet unit (defaults as sd-webui-controlnet's)."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None  # a PIL image (decoded), or None: img2img's init image
    mask: Any = None
    resize_mode: int = 1
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: int = 0
    union_control_type: str = "Unknown"  # union/ProMax ControlNets: the control type (by the module when Unknown)

    @property
    def active(self) -> bool:
        return self.enabled and self.weight != 0

    def infotext(self) -> str:
        """`Module: canny, Model: ..., Weight: 1, ...` as sd-webui-controlnet writes a unit."""
        shown = {"resize_mode": RESIZE_MODES[self.resize_mode], "control_mode": CONTROL_MODES[self.control_mode]}
        parts = []
        for name in INFOTEXT_FIELDS:
            value = shown.get(name, getattr(self, name))
            if isinstance(value, float) and value.is_integer() and name == "weight":
                value = int(value)
            parts.append(f"{' '.join(w.capitalize() for w in name.split('_'))}: {value}")
        return ", ".join(parts)


def _where(index: int, name: str) -> str:
    return f"controlnet unit {index} field {name!r}"


def _enum(value: Any, names: Sequence[str], aliases: Mapping[str, int], index: int, name: str) -> int:
    if isinstance(value, bool):
        raise api.InvalidParams(f"{_where(index, name)}: {value!r} is not one of {list(names)}")
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        if value in aliases:
            return aliases[value]
        if value.strip().isdigit() and int(value) < len(names):
            return int(value)
    raise api.InvalidParams(f"{_where(index, name)}: {value!r} is not one of {list(names)} (or 0-{len(names) - 1})")


def decode_image(value: Any, index: int, name: str) -> Image.Image | None:
    """A base64 image (optionally a data URL), a PIL image, or None; InvalidParams otherwise."""
    if value is None or value == "" or isinstance(value, Image.Image):
        return value or None
    if isinstance(value, Mapping):  # {"image": ..., "mask": ...}: the mask is handled by the caller
        return decode_image(value.get("image"), index, name)
    if not isinstance(value, str):
        raise api.InvalidParams(f"{_where(index, name)} must be a base64-encoded image")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError) as err:
        raise api.InvalidParams(f"{_where(index, name)} is not a readable base64 image: {err}") from None
    return image


def _number(value: Any, kind: type, index: int, name: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise api.InvalidParams(f"{_where(index, name)} must be a number")
    if kind is bool:
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes", "on")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise api.InvalidParams(f"{_where(index, name)} must be a number, not {value!r}") from None


def parse_unit(raw: Any, index: int) -> Unit:
    """One unit from a mapping (named fields) or a list (positional); InvalidParams names the bad field."""
    if isinstance(raw, Unit):
        return raw
    if isinstance(raw, list | tuple):
        if len(raw) > len(POSITIONAL):
            raise api.InvalidParams(f"controlnet unit {index}: {len(raw)} positional values; at most "
                                    f"{len(POSITIONAL)} ({', '.join(POSITIONAL)})")
        raw = dict(zip(POSITIONAL, raw, strict=False))
    if not isinstance(raw, Mapping):
        raise api.InvalidParams(f"controlnet unit {index} must be an object of unit fields or a list")
    values = dict(raw)
    for alias, name in _FIELD_ALIASES.items():
        if alias in values:
            if name in values and values[name] is not None:
                raise api.InvalidParams(f"controlnet unit {index} has both {alias!r} and {name!r}")
            values[name] = values.pop(alias)
    image = values.get("image")
    if isinstance(image, Mapping) and values.get("mask") is None:
        values["mask"] = image.get("mask")
    known = {f.name: f for f in fields(Unit)}
    unit = Unit(enabled=bool(values.get("enabled", True)))
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known or value is None or name == "enabled":
            continue  # unknown fields are ignored, as sd-webui-controlnet does
        if name in ("image", "mask"):
            changes[name] = decode_image(value, index, name)
        elif name == "resize_mode":
            changes[name] = _enum(value, RESIZE_MODES, _RESIZE_ALIASES, index, name)
        elif name == "control_mode":
            changes[name] = _enum(value, CONTROL_MODES, _CONTROL_ALIASES, index, name)
        elif name in ("module", "model"):
            changes[name] = str(value)
        else:
            changes[name] = _number(value, type(known[name].default), index, name)
    unit = replace(unit, **changes)
    _check_ranges(unit, index)
    return unit


def _check_ranges(unit: Unit, index: int) -> None:
    if not 0.0 <= unit.weight <= 2.0:
        raise api.InvalidParams(f"{_where(index, 'weight')}: {unit.weight} is outside 0-2")
    for name in ("guidance_start", "guidance_end"):
        if not 0.0 <= getattr(unit, name) <= 1.0:
            raise api.InvalidParams(f"{_where(index, name)}: {getattr(unit, name)} is outside 0-1")
    if unit.guidance_start > unit.guidance_end:
        raise api.InvalidParams(f"controlnet unit {index}: guidance_start ({unit.guidance_start}) is after "
                                f"guidance_end ({unit.guidance_end})")


def _flat_units(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The UI's flat form {"u0_module": ..., "u1_weight": ...} -> one dict per unit."""
    grouped: dict[int, dict[str, Any]] = {}
    for key, value in args.items():
        head, _, name = key.partition("_")
        if head[:1] == "u" and head[1:].isdigit() and name:
            grouped.setdefault(int(head[1:]), {})[name] = value
    return [grouped[i] for i in sorted(grouped)]


def parse_units(args: Any, limit: int) -> list[Unit]:
    """`extension_args["controlnet"]`: {"args": [unit, ...]} (or {"units": [...]}, or the UI's flat
    `u<N>_<field>` keys) -> units."""
    if isinstance(args, Mapping) and "args" not in args and "units" not in args:
        raw = _flat_units(args)
    elif isinstance(args, Mapping):
        raw = args.get("args", args.get("units", []))
    else:
        raw = args
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise api.InvalidParams('controlnet args must be a list of units: {"args": [{"module": ..., ...}]}')
    if raw and not isinstance(raw[0], Mapping | list | tuple | Unit):
        raw = [raw]  # one unit in the positional form
    if len(raw) > limit:
        raise api.InvalidParams(f"controlnet has {len(raw)} units; at most {limit} are allowed "
                                "(the control_net_unit_count setting)")
    return [parse_unit(u, i) for i, u in enumerate(raw)]


def parse_infotext(text: str) -> dict[str, Any]:
    """`Module: canny, Model: x, Weight: 1, ...` -> unit fields (PNG Info -> send to txt2img)."""
    out: dict[str, Any] = {"enabled": True}
    for item in text.split(","):
        if ": " not in item:
            continue
        key, value = item.strip().split(": ", 1)
        name = "_".join(w.lower() for w in key.split(" "))
        if value in ("True", "False"):
            out[name] = value == "True"
            continue
        for kind in (int, float):
            try:
                out[name] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[name] = value
    return out
