"""A style pack: prompt styles read from styles.yaml beside this file."""
from __future__ import annotations

from pathlib import Path

import yaml

from modules.plugins import api

STYLES_FILE = Path(__file__).with_name("styles.yaml")


def load_styles(path: Path) -> list[api.StyleSpec]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    styles = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise api.AtelierError(f"{path}: every style needs a name, got {entry!r}")
        styles.append(api.StyleSpec(str(entry["name"]), str(entry.get("prompt", "")),
                                    str(entry.get("negative_prompt", "")), source="style-pack"))
    return styles


@api.hookimpl
def register_styles() -> list[api.StyleSpec]:
    return load_styles(STYLES_FILE)
