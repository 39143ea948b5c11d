"""Textual-inversion files -> `api.EmbeddingSpec`: A1111's `string_to_param`, `emb_params`,
SDXL's `clip_l` / `clip_g`, and single-tensor (diffusers concept) files. The trigger word is the
file stem; the hash is the file's sha256, first 12 hex digits (A1111's "TI hashes")."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modules.plugins import api

from .library import LoraFileError, file_sha256, read_tensors, walk_files

log = logging.getLogger("atelier.ext.lora")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def _tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LoraFileError(f"{what} is not a tensor")
    value = value.detach().float()
    return value.unsqueeze(0) if value.ndim == 1 else value


def embedding_vectors(data: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The vectors by encoder key ("" for one-encoder files), from any supported layout."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise LoraFileError(f"{name}: string_to_param must hold exactly one tensor")
        return {"": _tensor(next(iter(params.values())), f"{name}: string_to_param")}
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _tensor(data["clip_l"], f"{name}: clip_l"), "clip_g": _tensor(data["clip_g"], f"{name}: clip_g")}
    if "emb_params" in data:
        return {"": _tensor(data["emb_params"], f"{name}: emb_params")}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:
        return {"": _tensor(next(iter(tensors.values())), name)}
    raise LoraFileError(f"{name} is not a textual-inversion embedding (keys: {sorted(map(str, data))[:6]})")


def load_embedding(path: Path) -> api.EmbeddingSpec:
    data = read_tensors(path)
    vectors = embedding_vectors(data, path.name)
    step = data.get("step")
    return api.EmbeddingSpec(
        name=path.stem, vectors=vectors, hash=file_sha256(path)[:12], path=str(path),
        step=int(step) if isinstance(step, int) else None,
        checkpoint=data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None,
        checkpoint_name=data.get("sd_checkpoint_name") if isinstance(data.get("sd_checkpoint_name"), str) else None)


@dataclass
class EmbeddingLibrary:
    """Embedding files of some folders; each file is parsed once per (mtime, size)."""

    roots: tuple[Path, ...]
    _parsed: dict[str, tuple[tuple[int, int], api.EmbeddingSpec | None]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # file name -> why it could not be read

    def files(self) -> list[Path]:
        return [path for _, path in walk_files(self.roots, EMBEDDING_SUFFIXES)]

    def specs(self) -> list[api.EmbeddingSpec]:
        """Every readable embedding, first of a name wins; unreadable files are logged once and kept in `errors`."""
        specs: dict[str, api.EmbeddingSpec] = {}
        for path in self.files():
            stat = path.stat()
            key, stamp = str(path), (stat.st_mtime_ns, stat.st_size)
            cached = self._parsed.get(key)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, load_embedding(path))
                    self.errors.pop(path.name, None)
                except (LoraFileError, OSError) as err:
                    log.warning("textual inversion %s skipped: %s", path, err)
                    self.errors[path.name] = str(err)
                    cached = (stamp, None)
                self._parsed[key] = cached
            if cached[1] is not None and cached[1].name not in specs:
                specs[cached[1].name] = cached[1]
        return list(specs.values())
