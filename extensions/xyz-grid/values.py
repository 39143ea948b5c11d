"""X/Y/Z axis text -> values: comma/CSV lists with quoting, integer and float ranges, permutations."""
from __future__ import annotations

import csv
import io
import itertools
import math
import re

from modules.plugins import api

MAX_VALUES = 1000  # per axis
_NUM = r"[+-]?\s*\d+(?:\.\d*)?"
_INT = r"[+-]?\s*\d+"
INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]?\d+)\s*\))?\s*")
INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*")
FLOAT_STEP = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})(?:\s*\(\s*([+-]?\d+(?:\.\d*)?)\s*\))?\s*")
FLOAT_COUNT = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*\[\s*(\d+)\s*\]\s*")


def split_values(text: str, raw_lines: bool = False) -> list[str]:
    """Comma-separated values, CSV quoting allowed ("a, b", c); with `raw_lines`, one value per line."""
    text = str(text or "")
    if raw_lines and "\n" in text.strip():
        return [line.strip() for line in text.strip().split("\n") if line.strip()]
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [item.strip() for row in rows for item in row if item.strip()]


def join_values(values: list[str]) -> str:
    """The inverse of `split_values` (CSV, quoting where needed)."""
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def _number(text: str) -> float:
    return float(text.replace(" ", ""))


def _check_count(where: str, count: int) -> None:
    if count > MAX_VALUES:
        raise api.InvalidParams(f"{where}: a range of {count} values; at most {MAX_VALUES} per axis")


def int_values(items: list[str], where: str) -> list[int]:
    """Whole numbers; `1-5`, `1-5 (+2)`, `5-1 (-1)` and `1-10 [4]` (4 evenly spaced) expand."""
    out: list[int] = []
    for item in items:
        step_match, count_match = INT_STEP.fullmatch(item), INT_COUNT.fullmatch(item)
        if step_match:
            start, end = int(_number(step_match[1])), int(_number(step_match[2]))
            step = int(step_match[3]) if step_match[3] else 1
            if step == 0:
                raise api.InvalidParams(f"{where}: range {item!r} has a step of 0")
            _check_count(where, abs(end - start) // abs(step) + 1)
            out += list(range(start, end + (1 if step > 0 else -1), step))
        elif count_match:
            start, end, count = int(_number(count_match[1])), int(_number(count_match[2])), int(count_match[3])
            _check_count(where, count)
            out += [int(start + (end - start) * i / max(count - 1, 1)) for i in range(count)]
        else:
            try:
                out.append(int(_number(item)))
            except ValueError:
                raise api.InvalidParams(f"{where}: {item!r} is not a whole number or a range like 1-5") from None
    return out


def float_values(items: list[str], where: str) -> list[float]:
    """Numbers; `1-2 (+0.25)` steps and `0-1 [5]` (5 evenly spaced) expand, ends included."""
    out: list[float] = []
    for item in items:
        step_match, count_match = FLOAT_STEP.fullmatch(item), FLOAT_COUNT.fullmatch(item)
        if step_match:
            start, end = _number(step_match[1]), _number(step_match[2])
            step = float(step_match[3]) if step_match[3] else 1.0
            if step == 0 or (end - start) * step < 0:
                raise api.InvalidParams(f"{where}: range {item!r} never reaches its end with step {step}")
            count = math.floor((end - start) / step + 1e-9) + 1
            _check_count(where, count)
            out += [round(start + i * step, 10) for i in range(count)]
        elif count_match:
            start, end, count = _number(count_match[1]), _number(count_match[2]), int(count_match[3])
            _check_count(where, count)
            out += [round(start + (end - start) * i / max(count - 1, 1), 10) for i in range(count)]
        else:
            try:
                value = float(item)
            except ValueError:
                raise api.InvalidParams(f"{where}: {item!r} is not a number or a range like 1-2 (+0.5)") from None
            if not math.isfinite(value):
                raise api.InvalidParams(f"{where}: {item!r} is not a finite number")
            out.append(value)
    return out


def permutation_values(items: list[str], where: str) -> list[tuple[str, ...]]:
    """Every order of the listed prompt parts (Prompt order)."""
    count = math.factorial(len(items))
    _check_count(where, count)
    return list(itertools.permutations(items))
