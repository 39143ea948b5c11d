"""LoRA files on disk: discovery, names, A1111's hash, training metadata, sidecar files, a small cache.

Names are paths relative to their folder without the extension ("style/ink"); the stem alone
("ink") finds a file too when it is unambiguous (the first one found wins, as A1111).
`NAME.preview.png` (or .png/.jpg/.jpeg/.webp beside it) is the card's picture; `NAME.json` holds
A1111's user metadata ("activation text", "preferred weight", "description", ...).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("atelier.ext.lora")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg",
                    ".webp")


class LoraFileError(ValueError):
    """A LoRA or embedding file that cannot be read; the message says which and why."""


def walk_files(roots: Iterable[Path], suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(root, file) pairs under each root, recursively, sorted; hidden folders are skipped."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(suffixes) and not name.lower().endswith(PREVIEW_SUFFIXES[:4]):
                    found.append((root, Path(folder) / name))
    return found


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header dict) of a safetensors file; a clear error when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LoraFileError(f"{path.name} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024 or length > path.stat().st_size - 8:
                raise LoraFileError(f"{path.name} is not a valid safetensors file (bad header length)")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraFileError(f"{path.name} is not a valid safetensors file (corrupt header: {err})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name} is not a valid safetensors file (header is not a mapping)")
    return length, header


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's body after the header (other files: the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            (length,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + length)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensors(path: Path) -> dict[str, Any]:
    """A LoRA / embedding file's contents: safetensors, or pickles through `weights_only` loading only."""
    if path.suffix.lower() == ".safetensors":
        safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise LoraFileError(f"{path.name} is not a valid safetensors file: {err}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, refused globals, truncated zips
        raise LoraFileError(f"{path.name} cannot be loaded safely: torch.load(weights_only=True) refused it "
                            f"({type(err).__name__}); only plain tensor files are read, never arbitrary pickles"
                            ) from None
    if not isinstance(data, dict):
        raise LoraFileError(f"{path.name} does not hold a dict of tensors")
    return data


def sidecar(path: Path) -> dict[str, Any]:
    """NAME.json beside a file (A1111's user metadata), or {}."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return {}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable metadata (%s)", json_path, err)
        return {}
    return data if isinstance(data, dict) else {}


def preview(path: Path) -> str | None:
    base = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return str(candidate)
    return None


@dataclass
class LoraFile:
    """One LoRA on disk; hash and metadata are read on first use."""

    name: str  # relative path without extension, "/"-separated
    path: Path
    root: Path
    _hash: str | None = None
    _metadata: dict[str, Any] | None = None

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return self.name.rsplit("/", 1)[0] if "/" in self.name else ""

    @property
    def shorthash(self) -> str:
        if self._hash is None:
            self._hash = addnet_hash(self.path)
        return self._hash[:12]

    def metadata(self) -> dict[str, Any]:
        """The safetensors `__metadata__` (kohya's ss_* training fields), or {}."""
        if self._metadata is None:
            self._metadata = {}
            if self.path.suffix.lower() == ".safetensors":
                try:
                    self._metadata = dict(safetensors_header(self.path)[1].get("__metadata__") or {})
                except (OSError, LoraFileError) as err:
                    log.warning("%s", err)
        return self._metadata

    @property
    def alias(self) -> str:
        return str(self.metadata().get("ss_output_name") or self.stem)


@dataclass
class LoraLibrary:
    """The LoRA files of some folders, rescanned by `refresh()`; parsed files are cached (LRU)."""

    roots: tuple[Path, ...]
    cache_size: int = 4
    files: dict[str, LoraFile] = field(default_factory=dict)
    _scanned: bool = False
    _tensors: OrderedDict = field(default_factory=OrderedDict)

    def refresh(self) -> list[LoraFile]:
        files: dict[str, LoraFile] = {}
        for root, path in walk_files(self.roots, LORA_SUFFIXES):
            name = path.relative_to(root).with_suffix("").as_posix()
            if name in files:
                log.warning("LoRA %r found twice; using %s", name, files[name].path)
                continue
            old = self.files.get(name)
            files[name] = old if old is not None and old.path == path else LoraFile(name, path, root)
        self.files, self._scanned = files, True
        return list(files.values())

    def all(self) -> list[LoraFile]:
        if not self._scanned:
            self.refresh()
        return list(self.files.values())

    def find(self, name: str) -> LoraFile | None:
        """By relative name, then by stem, then by alias (ss_output_name); rescans once when not found."""
        for files in (self.all, self.refresh):
            candidates = files()
            for key in (lambda f: f.name, lambda f: f.stem, lambda f: f.alias):
                match = next((f for f in candidates if key(f) == name), None)
                if match is not None:
                    return match
        return None

    def tensors(self, lora: LoraFile) -> dict[str, Any]:
        stat = lora.path.stat()
        key = (str(lora.path), stat.st_mtime_ns, stat.st_size)
        if key in self._tensors:
            self._tensors.move_to_end(key)
            return self._tensors[key]
        data = read_tensors(lora.path)
        self._tensors[key] = data
        while len(self._tensors) > self.cache_size:
            self._tensors.popitem(last=False)
        return data
