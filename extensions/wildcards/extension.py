"""Wildcards: `__colors__` in a prompt becomes one line of wildcards/colors.txt.

The choice is drawn from the job's seed (random seeds are resolved before
`prepare_params` runs), so the same seed always gives the same prompt, and the
expanded prompt is what infotext records. Wildcard files may use other wildcards
(up to a depth of 5); lines starting with "#" and blank lines are ignored.
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

from modules.plugins import api

WILDCARDS_DIR = Path(__file__).with_name("wildcards")
PATTERN = re.compile(r"__([\w/-]+?)__")
MAX_DEPTH = 5


def read_wildcard(folder: Path, name: str) -> list[str] | None:
    path = (folder / f"{name}.txt").resolve()
    if folder.resolve() not in path.parents or not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")] or None


def expand(text: str, seed: int, folder: Path = WILDCARDS_DIR, missing: set[str] | None = None) -> str:
    """Replace every __name__, drawing each occurrence from one generator seeded by `seed`."""
    rng = random.Random(f"wildcards:{seed}")
    for _ in range(MAX_DEPTH):
        if not PATTERN.search(text):
            break

        def pick(match: re.Match) -> str:
            choices = read_wildcard(folder, match.group(1))
            if choices is None:
                if missing is not None:
                    missing.add(match.group(1))
                return match.group(0)
            return rng.choice(choices)

        new_text = PATTERN.sub(pick, text)
        if new_text == text:
            break
        text = new_text
    return text


@api.hookimpl
def prepare_params(params, context: api.JobContext):
    fields = [f for f in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
              if isinstance(getattr(params, f, None), str) and PATTERN.search(getattr(params, f))]
    if not fields:
        return None
    missing: set[str] = set()
    changes = {f: expand(getattr(params, f), params.seed, missing=missing) for f in fields}
    if missing:
        context.warn(f"wildcards: no file for {', '.join(sorted('__' + m + '__' for m in missing))}; left as written")
    return dataclasses.replace(params, **changes)
