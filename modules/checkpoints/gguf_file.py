"""Read GGUF model files (ComfyUI-GGUF's layout for UNets, FLUX/SD3 transformers and T5) into
torch: float tensors as plain tensors, quantized ones as `PackedTensor`s that stay packed.

GGUF lists a tensor's dimensions innermost first; torch's order is the reverse. Tensor
names are the original checkpoint's (e.g. `double_blocks.0.img_attn.qkv.weight`), and
`general.architecture` names the family ("flux", "sd1", "sdxl", "sd3"). A tensor that
ComfyUI-GGUF stored flattened carries its real shape in `comfy.gguf.orig_shape.NAME`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.checkpoints.packed import PackedTensor
from modules.checkpoints.quant import QUANT_TYPES, packed_bytes, quant_type
from modules.errors import CheckpointError

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


@dataclass(frozen=True)
class GGUFContents:
    tensors: dict[str, torch.Tensor | PackedTensor]
    architecture: str | None
    formats: dict[str, int]  # format name -> tensor count, e.g. {"Q8_0": 300, "F32": 40}

    @property
    def weight_format(self) -> str:
        """The format of most tensors, for infotext and the model list ("Q8_0")."""
        packed = {k: v for k, v in self.formats.items() if k not in FLOAT_TYPES} or self.formats
        return max(packed, key=packed.get) if packed else "F32"


def _field_value(field) -> object:
    """A scalar, string or integer-array metadata value of a GGUFReader field."""
    parts = [field.parts[i] for i in field.data]
    if not parts:
        return None
    if len(parts) == 1 and parts[0].dtype == np.uint8:
        return bytes(parts[0]).decode("utf-8", errors="replace")
    values = [p.tolist()[0] if len(p) == 1 else p.tolist() for p in parts]
    return values[0] if len(values) == 1 else values


def _metadata(reader) -> dict[str, object]:
    return {name: _field_value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _check_entry(entry, shape: tuple[int, ...], path: Path) -> str:
    """The entry's format name, once its type is one Atelier reads and its bytes are all there."""
    fmt = entry.tensor_type.name
    if fmt not in QUANT_TYPES:
        raise CheckpointError(f"{path.name}: tensor {entry.name} uses GGUF quantization {fmt}, which Atelier "
                              f"does not read ({', '.join(QUANT_TYPES)}); use another quant of this model")
    have, need = int(entry.data.nbytes), packed_bytes(quant_type(fmt), shape)
    if have != need:
        raise CheckpointError(f"{path.name}: tensor {entry.name} holds {have} bytes, its shape {shape} "
                              f"in {fmt} needs {need}; the file is truncated or corrupt. Download it again.")
    return fmt


def _tensor(entry, shape: tuple[int, ...], path: Path) -> torch.Tensor | PackedTensor:
    fmt = _check_entry(entry, shape, path)
    raw = torch.from_numpy(np.array(entry.data, copy=True)).view(torch.uint8).reshape(-1)
    if fmt in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[fmt]).reshape(shape)
    return PackedTensor(raw, fmt, shape)


def _open(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as err:
        raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt: "
                              f"{type(err).__name__}: {str(err)[:120]}). Download it again.") from err


def _shape(entry, meta: dict[str, object]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stored shape in torch order, logical shape from `comfy.gguf.orig_shape`, else the same)."""
    shape = tuple(int(n) for n in reversed(entry.shape.tolist()))
    original = meta.get(ORIG_SHAPE_KEY + entry.name)
    return shape, tuple(int(n) for n in original) if original is not None else shape


def _contents(path: Path, load: bool) -> GGUFContents:
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    tensors: dict[str, torch.Tensor | PackedTensor] = {}
    formats: dict[str, int] = {}
    for entry in reader.tensors:
        stored, logical = _shape(entry, meta)
        if load:
            tensor = _tensor(entry, stored, path)
            tensors[entry.name] = tensor.reshape(logical) if logical != stored else tensor
        else:
            _check_entry(entry, stored, path)
            tensors[entry.name] = torch.empty(logical, device="meta")
        formats[entry.tensor_type.name] = formats.get(entry.tensor_type.name, 0) + 1
    arch = meta.get("general.architecture")
    return GGUFContents(tensors, str(arch) if arch is not None else None, formats)


def read_gguf(path: Path) -> GGUFContents:
    """All tensors of a GGUF file; CheckpointError for a truncated, corrupt or unsupported file."""
    return _contents(path, load=True)


def inspect_gguf(path: Path) -> GGUFContents:
    """A GGUF file's tensors as meta tensors of their logical shapes, every entry checked (no weights read)."""
    return _contents(path, load=False)
