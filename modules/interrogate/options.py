"""A1111's interrogation options (Settings > Interrogate), with their names and defaults.

`InterrogateOptions.from_options(values)` reads them from an A1111 options mapping
(/sdapi/v1/options); missing keys keep A1111 1.10's defaults.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modules.errors import InvalidParams

_SPECIAL = re.compile(r"([\\()])")  # escaped so the prompt parser reads them literally


@dataclass(frozen=True)
class InterrogateOptions:
    interrogate_keep_models_in_memory: bool = False
    interrogate_return_ranks: bool = False
    interrogate_clip_num_beams: int = 1
    interrogate_clip_min_length: int = 24
    interrogate_clip_max_length: int = 48
    interrogate_clip_dict_limit: int = 1500  # lines read per list; 0 = all
    interrogate_clip_skip_categories: tuple[str, ...] = ()
    interrogate_deepbooru_score_threshold: float = 0.5
    deepbooru_sort_alpha: bool = True
    deepbooru_use_spaces: bool = True
    deepbooru_escape: bool = True
    deepbooru_filter_tags: str = ""

    @classmethod
    def from_options(cls, values: Mapping[str, Any] | None) -> InterrogateOptions:
        """The options in `values` (others default); InvalidParams naming a value of the wrong kind."""
        given = {}
        for f in dataclasses.fields(cls):
            if values is not None and f.name in values and values[f.name] is not None:
                given[f.name] = _coerce(f.name, f.default, values[f.name])
        found = cls(**given)
        if found.interrogate_clip_min_length > found.interrogate_clip_max_length:
            raise InvalidParams("interrogate_clip_min_length must not exceed interrogate_clip_max_length",
                                field="interrogate_clip_min_length")
        return found

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["interrogate_clip_skip_categories"] = list(self.interrogate_clip_skip_categories)
        return data


def _coerce(name: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidParams(f"{name} must be true or false, got {value!r}", field=name)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or not 0 <= value <= 100000:
            raise InvalidParams(f"{name} must be a whole number from 0, got {value!r}", field=name)
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise InvalidParams(f"{name} must be a number from 0 to 1, got {value!r}", field=name)
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise InvalidParams(f"{name} must be a list of category names, got {value!r}", field=name)
        return tuple(str(v) for v in value)
    return str(value)


def format_tags(scores: Mapping[str, float], options: InterrogateOptions) -> str:
    """DeepDanbooru's tags as A1111 writes them: those at or above the threshold, "rating:" tags and
    filtered tags dropped, sorted alphabetically or by falling score, underscores to spaces and
    brackets escaped as chosen, each as "(tag:0.987)" with ranks; joined by ", "."""
    threshold = options.interrogate_deepbooru_score_threshold
    kept = {tag: score for tag, score in scores.items() if score >= threshold and not tag.startswith("rating:")}
    if options.deepbooru_sort_alpha:
        ordered = sorted(kept)
    else:
        ordered = [tag for tag, _ in sorted(kept.items(), key=lambda item: -item[1])]
    dropped = {t.strip().replace(" ", "_") for t in options.deepbooru_filter_tags.split(",")}
    out = []
    for tag in ordered:
        if tag in dropped:
            continue
        text = tag.replace("_", " ") if options.deepbooru_use_spaces else tag
        if options.deepbooru_escape:
            text = _SPECIAL.sub(r"\\\1", text)
        out.append(f"({text}:{kept[tag]:.3f})" if options.interrogate_return_ranks else text)
    return ", ".join(out)
