"""Find checkpoints, VAEs and side files on disk, and compute A1111's short model hash."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from modules.checkpoints.model import CheckpointInfo
from modules.errors import CheckpointError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".gguf")  # GGUF: UNets and transformers alone
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
_VAE_BESIDE = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


def _is_vae_file(path: Path) -> bool:
    return ".vae." in path.name.lower()


def _info(path: Path, root: Path | None) -> CheckpointInfo:
    if path.is_dir():
        fmt, rel = "diffusers", path.relative_to(root) if root else Path(path.name)
    else:
        suffix = path.suffix.lower()
        fmt = "safetensors" if suffix == ".safetensors" else "gguf" if suffix == ".gguf" else "ckpt"
        rel = (path.relative_to(root) if root else Path(path.name)).with_suffix("")
    return CheckpointInfo(path=path, name=rel.as_posix(), format=fmt)


def _walk(root: Path) -> Iterable[Path]:
    """Checkpoint files and diffusers folders under `root`; a diffusers folder is not entered."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames.sort()
        if "model_index.json" in filenames and here != root:
            dirnames.clear()
            yield here
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            p = here / name
            if p.suffix.lower() in CHECKPOINT_SUFFIXES and not _is_vae_file(p) and not name.startswith("."):
                yield p


def find_checkpoints(dirs: list[Path], files: Iterable[Path] = ()) -> list[CheckpointInfo]:
    """Every checkpoint under `dirs` (recursively) plus the explicit `files`, sorted by name.

    Single files (.safetensors, .ckpt, .pt) and diffusers folders (holding model_index.json) count;
    `*.vae.*` files are VAEs and are skipped. A path found twice is listed once.
    """
    found: dict[Path, CheckpointInfo] = {}
    for f in files:
        f = Path(f)
        if f.exists():
            found.setdefault(f.resolve(), _info(f, None))
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        if (d / "model_index.json").exists():
            found.setdefault(d.resolve(), _info(d, d.parent))
            continue
        for p in _walk(d):
            found.setdefault(p.resolve(), _info(p, d))
    return sorted(found.values(), key=lambda i: (i.name.lower(), str(i.path)))


def find_vaes(directory: Path) -> list[Path]:
    """VAE files under `directory`, recursively, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in VAE_SUFFIXES
                  and not p.name.startswith("."))


def _beside(ckpt_path: Path, suffixes: Iterable[str]) -> Path | None:
    ckpt_path = Path(ckpt_path)
    stem = ckpt_path.name if ckpt_path.is_dir() else ckpt_path.with_suffix("").name
    for suffix in suffixes:
        candidate = ckpt_path.parent / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def vae_beside_checkpoint(ckpt_path: Path) -> Path | None:
    """`NAME.vae.safetensors` (or .vae.pt / .vae.ckpt) next to `NAME.<ext>`, if present."""
    return _beside(ckpt_path, _VAE_BESIDE)


def yaml_beside_checkpoint(ckpt_path: Path) -> Path | None:
    """`NAME.yaml` next to `NAME.<ext>` (an A1111 / ldm model config), if present."""
    return _beside(ckpt_path, (".yaml",))


def _load_cache(cache_file: Path) -> dict[str, dict]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """The full sha256 of a file, cached by (path, mtime, size) in the JSON `cache_file`."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        raise CheckpointError(f"Cannot hash {path}: {err.strerror or err}") from err
    key = str(path.resolve())
    cache = _load_cache(cache_file) if cache_file else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("mtime") == st.st_mtime and entry.get("size") == st.st_size:
        return str(entry["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache_file:
        cache[key] = {"mtime": st.st_mtime, "size": st.st_size, "sha256": digest}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # one temporary name per thread: workers of one process (--devices) may hash at the same time
        tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(cache_file)
    return digest


def model_hash(path: Path, cache_file: Path | None = None) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    return file_sha256(path, cache_file)[:10]
