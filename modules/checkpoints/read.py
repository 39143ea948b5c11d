"""Read a checkpoint file's tensors without running code and without a second full copy.

`.safetensors` files are opened with `safe_open` (memory-mapped, tensor by tensor). Pickle files
(`.ckpt`, `.pt`, `.pth`, `.bin`) only go through `torch.load(weights_only=True)`: a pickle that asks
for anything beyond tensors and plain containers is refused, never executed.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modules.checkpoints.stream import Entry, read_entries
from modules.errors import CheckpointError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# What torch's weights-only unpickler says when a pickle asks for a callable or class.
_CODE_MARKERS = ("unsupported global", "unsupported class", "unrecognized function", "not an allowed global",
                 "can only build", "unsupported reduce")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes)")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when absent); checks the header first."""
    path = Path(path)
    _check_file(path)
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"Checkpoint {path} is not a readable safetensors file: {err}") from err


def _check_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Validate the header and that the file holds every byte the header promises;
    returns the header's length in bytes and the parsed header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"Checkpoint {path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"Checkpoint {path} is not a safetensors file, or is truncated "
                                  f"(header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"Checkpoint {path} has a corrupt safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"Checkpoint {path} has a corrupt safetensors header")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"Checkpoint {path} is truncated: {size} bytes, the header needs {8 + n + end}")
    if end == 0:
        raise CheckpointError(f"Checkpoint {path} holds no tensors")
    return n, header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"Checkpoint {path} could not be read as safetensors: {err}") from err


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_entries(path: Path, channels_last: tuple[str, ...] = ()) -> list[Entry] | None:
    """The tensors a safetensors file's (validated) header describes, in file order; 4-D tensors whose
    keys start with a prefix in `channels_last` are marked for NHWC. None when a dtype is unknown here."""
    n, header = _check_safetensors_header(path)
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if any(isinstance(v, dict) and v.get("dtype") not in _SAFETENSORS_DTYPES for _, v in tensors):
        return None
    try:
        entries = [_entry(key, v, 8 + n, key.startswith(channels_last)) for key, v in tensors]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"Checkpoint {path} has a corrupt safetensors header: "
                              f"a tensor entry lacks a valid shape or offsets ({err!r})") from err
    return sorted(entries, key=lambda e: e.start)


def _entry(key: str, v: dict[str, Any], data_start: int, channels_last: bool) -> Entry:
    shape, (begin, end) = tuple(v["shape"]), v["data_offsets"]
    if not all(type(i) is int for i in (*shape, begin, end)):
        raise TypeError(f"{key}: shape {shape} and offsets {[begin, end]} must be integers")
    if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise ValueError(f"{key}: shape {list(shape)}, offsets {[begin, end]}")
    return Entry(key, _SAFETENSORS_DTYPES[v["dtype"]], shape, start=data_start + begin, nbytes=end - begin,
                 channels_last=channels_last)


def _read_safetensors_as(path: Path, dtype: torch.dtype, channels_last: tuple[str, ...] = ()
                         ) -> dict[str, torch.Tensor] | None:
    """Every tensor read with plain file reads, floating ones converted to `dtype` piece by piece.

    Nothing is memory-mapped, so the process holds the converted weights plus a few MB per reading
    thread (a mapped fp16 file stays resident beside its bf16 copy until it is unmapped). Returns None
    for dtypes this reader does not know, or a big-endian machine; the caller falls back to safe_open.
    """
    entries = safetensors_entries(path, channels_last) if sys.byteorder == "little" else None
    return None if entries is None else read_entries(path, entries, dtype)


def _torch_load(path: Path) -> Any:
    """`torch.load` restricted to weights; mmap for the zip format, plain read for legacy pickles."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip()
        if any(m in detail.lower() for m in _CODE_MARKERS):
            found = re.search(r"GLOBAL ([\w.]+)", detail)
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"Checkpoint {path} was refused: it contains code{what} or objects other than weights, "
                "and loading it would run that code. Convert it to .safetensors with a trusted tool, "
                "or use a .safetensors release of the model.") from err
        raise CheckpointError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint: "
                              f"{detail.splitlines()[0][:200] if detail else err}") from err
    except MemoryError:
        raise
    except Exception as err:  # the weights-only unpickler fails on garbage with any error type
        raise CheckpointError(f"Checkpoint {path} is corrupt, truncated or not a PyTorch checkpoint: "
                              f"{type(err).__name__}: {str(err)[:300]}") from err


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {...}} and {"model": {"state_dict": ...}} nestings
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict) and len(obj) <= 3:
            obj = obj["module"]
        elif isinstance(obj, dict) and isinstance(obj.get("params_ema", obj.get("params")), dict):
            obj = obj.get("params_ema", obj.get("params"))  # BasicSR / Real-ESRGAN releases
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint {path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"Checkpoint {path} holds no tensors")
    return tensors


def read_state_dict(path: Path, dtype: torch.dtype | None = None, channels_last: tuple[str, ...] = ()
                    ) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, keyed as stored.

    With `dtype`, floating tensors of a .safetensors file are converted to it while reading,
    piece by piece (peak memory: the converted weights, not the file plus them). Their 4-D tensors
    whose keys start with a prefix in `channels_last` are then laid out NHWC as they are read.

    Raises CheckpointError for missing, empty, truncated or corrupt files and
    UnsafeCheckpointError for pickles that would need code execution.
    """
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        if dtype is not None:
            converted = _read_safetensors_as(path, dtype, channels_last)
            if converted is not None:
                return converted
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _unwrap(_torch_load(path), path)
    raise CheckpointError(f"Checkpoint {path} has an unsupported extension {suffix!r} "
                          f"(expected .safetensors, .ckpt or .pt)")
