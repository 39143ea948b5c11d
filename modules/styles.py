"""Prompt styles: A1111's styles.csv format and its merge rule.

A style's prompt is merged into the user's prompt at `{prompt}` when it has that
placeholder; otherwise it is appended after ", ". The negative prompt works the same way.
"""
from __future__ import annotations

import csv
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from modules.errors import AtelierError, InvalidParams
from modules.plugins.registry import NamedRegistry
from modules.plugins.specs import StyleSpec

CSV_FIELDS = ("name", "prompt", "negative_prompt")
MAX_STYLED_CHARS = 1 << 20  # a styled prompt longer than this is refused, not built


def merge_prompt(style_prompt: str, prompt: str, max_chars: int = MAX_STYLED_CHARS) -> str:
    """A1111's rule: every "{prompt}" in the style becomes the prompt, else the style is appended.

    A style with many placeholders multiplies the prompt's length (and chained styles multiply
    again), so the result's length is checked before it is built.
    """
    placeholders = style_prompt.count("{prompt}")
    size = len(style_prompt) + placeholders * (len(prompt) - len("{prompt}")) if placeholders else 0
    if size > max_chars:
        raise InvalidParams(f"the styles make the prompt {size:,} characters long; the limit is {max_chars:,} "
                            "(a style repeats {prompt} too often)", field="styles")
    if placeholders:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: Iterable[StyleSpec],
                 max_chars: int = MAX_STYLED_CHARS) -> tuple[str, str]:
    """Apply styles in order to the prompt and the negative prompt; InvalidParams past `max_chars`."""
    for style in styles:
        prompt = merge_prompt(style.prompt, prompt, max_chars)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt, max_chars)
    return prompt, negative_prompt


def load_styles_csv(path: Path, source: str = "styles.csv") -> list[StyleSpec]:
    """Read A1111's styles.csv: columns name, prompt (or the older "text"), negative_prompt.

    Rows without a name, and rows whose name starts with "#" (A1111's dividers), are skipped.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AtelierError(f"Cannot read styles from {path}: {err}") from err
    styles = []
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name or name.startswith("#"):
            continue
        prompt = row.get("prompt") if "prompt" in row else row.get("text")
        styles.append(StyleSpec(name, prompt or "", row.get("negative_prompt") or "", source))
    return styles


def save_styles_csv(path: Path, styles: Iterable[StyleSpec]) -> None:
    """Write styles in A1111's format (atomically), for the UI's "save style" button."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8-sig", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for style in styles:
            writer.writerow({"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt})
    tmp.replace(path)


class StyleStore:
    """One app's prompt styles: the registered ones plus those saved from the UI.

    Built once per app by `build_registries`; it is the only part of the registries that changes
    after start-up. Reads see a snapshot; `save` writes the styles file and swaps in a new snapshot.
    """

    kind = "style"

    def __init__(self, specs: Iterable[StyleSpec], path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._registry: NamedRegistry[StyleSpec] = NamedRegistry(self.kind, specs)

    def get(self, name: str) -> StyleSpec:
        """The style by name (case-insensitive); raises InvalidParams naming the known ones."""
        return self._registry.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._registry

    def __iter__(self) -> Iterator[StyleSpec]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def names(self) -> list[str]:
        return self._registry.names()

    def save(self, spec: StyleSpec) -> Path:
        """Add or replace `spec` in the styles file (A1111's styles.csv) and in this store."""
        if self.path is None:
            raise AtelierError("No styles file is configured, so styles cannot be saved.")
        key = spec.name.lower()
        with self._lock:
            existing = load_styles_csv(self.path) if self.path.exists() else []
            save_styles_csv(self.path, [s for s in existing if s.name.lower() != key] + [spec])
            specs = list(self._registry)
            at = next((n for n, s in enumerate(specs) if s.name.lower() == key), len(specs))
            specs[at:at + 1] = [spec]  # a replaced style keeps its place in the dropdown
            self._registry = NamedRegistry(self.kind, specs)
        return self.path
