"""A1111's infotext: the `parameters` text stored in PNG chunks and EXIF comments.

Layout, written by `build` and read by `parse`::

    <prompt, possibly several lines>
    Negative prompt: <negative, possibly several lines>     (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Compatibility decisions (A1111 1.10 is the reference):

- Numbers print as A1111's UI writes them. Gradio hands A1111 JavaScript numbers,
  so a CFG scale of 7 arrives as the int 7 and prints "7"; 7.5 prints "7.5". We
  print integral floats without ".0" (A1111's API path, which uses pydantic
  floats, would print "7.0"; files in the wild overwhelmingly say "7").
- A value is JSON-quoted (ensure_ascii=False) when it contains ",", ":" or a
  newline, as A1111 does. We also quote the few values A1111 would garble on
  reading back: the empty string, values with leading or trailing whitespace,
  and values that start with a double quote. A1111's parser decodes all of
  these correctly.
- A value whose text equals its key is written as the bare key (A1111 does
  this); such an entry cannot be parsed back.
- `parse` keeps values as strings, as A1111 does, and fills in A1111's defaults
  for missing keys (see `_fill_defaults`). Unlike A1111 it keeps empty values
  ("Key: ,") as "" instead of dropping them.
- Not done here: prompt-style extraction (styles module), hypernetwork prompt
  tags, and A1111's version-based back-compat flags.

Round-trip contract: `parse(build(p, n, f))` returns p, n and every non-None
field as its printed string (sizes split into "-1"/"-2"), provided that prompt
lines carry no leading/trailing whitespace, the prompt does not start with blank
lines, no prompt line starts with "Negative prompt:", at least 3 fields are
given, and no value equals its key. Lines are split on "\\n" only; a "\\r\\n"
in a prompt comes back as "\\n".
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from modules.errors import InvalidParams

# Keys that A1111's create_infotext places first, in this order.
LEADING_KEYS: tuple[str, ...] = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
    "Face restoration", "Size", "Model hash", "Model", "FP8 weight",
    "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
# Keys that come after all extra parameters.
TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

# Scheduler labels, names and aliases that old sampler names carried as a
# suffix ("DPM++ 2M Karras"), as A1111 1.10's schedulers table spells them.
SCHEDULE_SUFFIXES: Mapping[str, str] = {
    "Automatic": "Automatic", "automatic": "Automatic",
    "Uniform": "Uniform", "uniform": "Uniform",
    "Karras": "Karras", "karras": "Karras",
    "Exponential": "Exponential", "exponential": "Exponential",
    "Polyexponential": "Polyexponential", "polyexponential": "Polyexponential",
    "SGM Uniform": "SGM Uniform", "sgm_uniform": "SGM Uniform", "SGMUniform": "SGM Uniform",
    "KL Optimal": "KL Optimal", "kl_optimal": "KL Optimal",
    "Align Your Steps": "Align Your Steps", "align_your_steps": "Align Your Steps",
    "Simple": "Simple", "simple": "Simple",
    "Normal": "Normal", "normal": "Normal",
    "DDIM": "DDIM", "ddim": "DDIM",
    "Beta": "Beta", "beta": "Beta",
}

_NEGATIVE = "Negative prompt:"
# One `key: value` pair of the last line; a value is either a JSON string or runs to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_KEY = re.compile(r"\w[\w \-/]+")
_RE_SPACE = re.compile(r"\s*")
_RE_KEY_RUN = re.compile(r"\w[\w \-/]*")
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def format_value(value: Any) -> str:
    """Print a field value as A1111's UI does (integral floats without ".0")."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value)


def quote(value: Any) -> str:
    """Format `value` and JSON-quote it when it could not be read back raw."""
    text = format_value(value)
    needs_quotes = (
        "," in text or ":" in text or "\n" in text
        or text == "" or text != text.strip() or text.startswith('"')
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def _keep(key: str, value: Any) -> bool:
    """A1111's rules for leaving a field out of the infotext."""
    if value is None:
        return False
    if key == "Clip skip":
        try:
            return int(value) > 1
        except (TypeError, ValueError):
            return True
    if key == "RNG":
        return value != "GPU"
    return True


def _ordered(fields: Mapping[str, Any]) -> list[tuple[str, Any]]:
    fixed = set(LEADING_KEYS) | set(TRAILING_KEYS)
    keys = [k for k in LEADING_KEYS if k in fields]
    keys += [k for k in fields if k not in fixed]
    keys += [k for k in TRAILING_KEYS if k in fields]
    return [(k, fields[k]) for k in keys if _keep(k, fields[k])]


def build(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """Write an A1111 infotext; `fields` may come in any order, None values are skipped."""
    parts = []
    for key, value in _ordered(fields):
        if not isinstance(key, str) or not _RE_KEY.fullmatch(key):
            raise InvalidParams(
                f"Infotext key {key!r} is not allowed: use letters, digits, spaces, '-', '/' or '_' "
                "(at least two characters, not starting with a space, '-' or '/')."
            )
        text = format_value(value)
        parts.append(key if text == key else f"{key}: {quote(value)}")
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def param_pairs(line: str) -> list[tuple[str, str]]:
    """`_RE_PARAM.findall(line)` in linear time.

    Where findall fails at a position it retries at the next one, which rescans the same run
    of key characters each time (quadratic on a long prompt). A failed key fails for every start
    inside its run too, so the scan jumps to the run's end instead.
    """
    pairs, pos, size = [], 0, len(line)
    while pos < size:
        match = _RE_PARAM.match(line, pos)
        if match:
            pairs.append(match.groups())
            pos = match.end()
            continue
        start = _RE_SPACE.match(line, pos).end()
        run = _RE_KEY_RUN.match(line, start)
        pos = max(run.end() if run else start + 1, pos + 1)
    return pairs


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE):
            target = negative
            line = line[len(_NEGATIVE):].strip()
        if target or line:  # A1111 drops blank lines before the first text
            target.append(line)
    return "\n".join(prompt), "\n".join(negative)


def _split_schedule(sampler: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    for suffix in sorted(suffixes, key=len, reverse=True):  # longest first: "SGM Uniform" before "Uniform"
        if sampler.endswith(" " + suffix):
            return sampler[: -len(suffix) - 1], suffixes[suffix]
    return None


def _infer_schedules(res: dict[str, Any], suffixes: Mapping[str, str]) -> None:
    """Old infotexts named the schedule in the sampler ("DPM++ 2M Karras"); split it off."""
    for sampler_key, schedule_key in (("Sampler", "Schedule type"), ("Hires sampler", "Hires schedule type")):
        sampler = res.get(sampler_key)
        if schedule_key in res or not isinstance(sampler, str):
            continue
        found = _split_schedule(sampler, suffixes)
        if found:
            res[sampler_key], res[schedule_key] = found


def old_hires_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """A1111's pre-1.0 hires fix: the first pass has about 512x512 pixels, in multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires(res: dict[str, Any]) -> None:
    """Turn the old "First pass size" into a first-pass Size plus a Hires resize target."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if first_w == 0 or first_h == 0:
            first_w, first_h = old_hires_first_pass_size(width, height)
    except (TypeError, ValueError, ZeroDivisionError):
        return
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", 0),
    ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_LATE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _fill_defaults(res: dict[str, Any], suffixes: Mapping[str, str]) -> None:
    """What A1111's parse_generation_parameters assumes for keys an infotext leaves out."""
    for key, value in _DEFAULTS:
        res.setdefault(key, value)
    _restore_old_hires(res)
    _infer_schedules(res, suffixes)
    for key, value in _LATE_DEFAULTS:
        res.setdefault(key, value)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)


def parse(
    text: str, *, defaults: bool = True, schedule_suffixes: Mapping[str, str] = SCHEDULE_SUFFIXES
) -> dict[str, Any]:
    """Read an infotext into A1111's key names ("Prompt", "Negative prompt", "Size-1", ...).

    The last line holds the parameters only if the key/value pattern matches at
    least 3 times; otherwise it belongs to the prompt. Values stay strings; a
    "WxH" value becomes "<key>-1" and "<key>-2". With `defaults`, keys that A1111
    fills in when missing are added (a few as ints, as A1111 does), and a
    schedule named in an old sampler name ("Euler Karras") becomes "Schedule
    type". `schedule_suffixes` maps suffix spellings to schedule labels.
    """
    *lines, last = text.strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative = _split_prompts(lines)
    res: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        value = _unquote(value)
        size = _RE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    if defaults:
        _fill_defaults(res, schedule_suffixes)
    return res
