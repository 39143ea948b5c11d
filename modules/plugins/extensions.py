"""Extension records: metadata from extension.toml, API-version checks, ordering, enable/disable state."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

from modules.errors import AtelierError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
STATE_FILE = "extensions.json"


class ExtensionError(AtelierError):
    """An extension failed in something the user explicitly asked for."""


@dataclass(frozen=True)
class HookError:
    """One failed hook call: which plugin, which hook, the error line and the stack trace."""

    plugin: str
    hook: str
    message: str
    traceback: str = ""


@dataclass
class ExtensionInfo:
    """One discovered extension, as the Extensions tab and /sdapi/v1/extensions show it."""

    name: str
    version: str = ""
    api_version: str = ""
    description: str = ""
    path: Path | None = None
    source: str = "folder"  # "folder" or "entry point"
    bundled: bool = False
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    requirements: Path | None = None
    enabled: bool = True  # the persisted user choice
    status: str = "pending"  # loaded, disabled, skipped, incompatible, failed
    load_time_s: float = 0.0
    error: str = ""
    traceback: str = ""
    warnings: list[str] = field(default_factory=list)
    hook_errors: list[HookError] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.status == "loaded"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "api_version": self.api_version,
            "description": self.description, "path": str(self.path) if self.path else None,
            "source": self.source, "bundled": self.bundled, "enabled": self.enabled,
            "status": self.status, "load_time_s": round(self.load_time_s, 4), "error": self.error,
            "warnings": list(self.warnings),
            "hook_errors": [{"hook": e.hook, "message": e.message} for e in self.hook_errors],
        }


def parse_version(text: str) -> tuple[int, int]:
    """"1", "1.2" or "1.2.3" -> (major, minor)."""
    parts = str(text).strip().split(".")
    try:
        numbers = [int(p) for p in parts[:2]]
    except ValueError as err:
        raise ValueError(f"not a version: {text!r}") from err
    return numbers[0], numbers[1] if len(numbers) > 1 else 0


def api_compatible(required: str, provided: str) -> bool:
    """Same major version, and the required minor is no newer than the provided one."""
    want, have = parse_version(required), parse_version(provided)
    return want[0] == have[0] and want[1] <= have[1]


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{key} must be a name or a list of names")


def info_from_metadata(name: str, meta: Mapping[str, Any], path: Path | None, source: str) -> ExtensionInfo:
    """Build an ExtensionInfo from extension.toml's table (or an entry point's EXTENSION dict)."""
    name = str(meta.get("name") or name)
    info = ExtensionInfo(name=name, path=path, source=source)
    if not NAME_PATTERN.match(name):
        info.status, info.error = "failed", f"invalid extension name {name!r} (letters, digits, '-' and '_')"
        return info
    try:
        info.version = str(meta.get("version", ""))
        info.description = str(meta.get("description", ""))
        info.before = _names(meta.get("before"), "before")
        info.after = _names(meta.get("after"), "after")
        info.api_version = str(meta.get("api_version", ""))
        if not info.api_version:
            raise ValueError("api_version is required (the plugin API version the extension was written for)")
        parse_version(info.api_version)
        requirements = meta.get("requirements", "requirements.txt")
        if path is not None and requirements and (path / requirements).is_file():
            info.requirements = path / requirements
    except ValueError as err:
        info.status, info.error = "failed", f"bad metadata: {err}"
    return info


def read_folder_metadata(folder: Path) -> ExtensionInfo:
    """Read extensions/<name>/extension.toml; a missing or unreadable file makes a failed record."""
    toml_path = folder / "extension.toml"
    if not toml_path.is_file():
        info = ExtensionInfo(name=folder.name, path=folder)
        info.status, info.error = "failed", "extension.toml is missing"
        return info
    try:
        meta = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        info = ExtensionInfo(name=folder.name, path=folder)
        info.status, info.error = "failed", f"extension.toml: {err}"
        return info
    return info_from_metadata(folder.name, meta, folder, "folder")


def order_extensions(infos: Iterable[ExtensionInfo]) -> list[ExtensionInfo]:
    """Sort by `before`/`after`, otherwise by name; a cycle is broken by name, with a warning."""
    pending = sorted(infos, key=lambda i: i.name.lower())
    names = {i.name for i in pending}
    after: dict[str, set[str]] = {i.name: set() for i in pending}  # name -> names that must come first
    for info in pending:
        after[info.name] |= {n for n in info.after if n in names and n != info.name}
        for other in info.before:
            if other in names and other != info.name:
                after[other].add(info.name)
    ordered: list[ExtensionInfo] = []
    while pending:
        done = {i.name for i in ordered}
        ready = next((i for i in pending if after[i.name] <= done), None)
        if ready is None:
            ready = pending[0]
            cycle = ", ".join(sorted(i.name for i in pending if not after[i.name] <= done))
            ready.warnings.append(f"before/after ordering has a cycle among: {cycle}; ordered by name")
            after[ready.name] = set()
        pending.remove(ready)
        ordered.append(ready)
    return ordered


class ExtensionState:
    """The persisted enable/disable choices, in data/extensions.json; applied at the next start."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / STATE_FILE

    def disabled(self) -> set[str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as err:
            raise AtelierError(f"Cannot read {self.path}: {err}") from err
        return {str(n) for n in data.get("disabled", [])}

    def set_enabled(self, name: str, enabled: bool) -> None:
        disabled = self.disabled()
        (disabled.discard if enabled else disabled.add)(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"disabled": sorted(disabled)}, indent=2), encoding="utf-8")
        tmp.replace(self.path)
