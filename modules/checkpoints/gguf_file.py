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


def _tensor(entry, shape: tuple[int, ...], path: Path) -> torch.Tensor | PackedTensor:
    fmt = entry.tensor_type.name
    if fmt not in QUANT_TYPES:
        raise CheckpointError(f"{path.name}: tensor {entry.name} uses GGUF quantization {fmt}, which Atelier "
                              f"does not read ({', '.join(QUANT_TYPES)}); use another quant of this model")
    raw = torch.from_numpy(np.array(entry.data, copy=True)).view(torch.uint8).reshape(-1)
    qtype = quant_type(fmt)
    if raw.numel() != packed_bytes(qtype, shape):
        raise CheckpointError(f"{path.name}: tensor {entry.name} holds {raw.numel()} bytes, its shape {shape} "
                              f"in {fmt} needs {packed_bytes(qtype, shape)}; the file is corrupt")
    if fmt in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[fmt]).reshape(shape)
    return PackedTensor(raw, fmt, shape)


def read_gguf(path: Path) -> GGUFContents:
    """All tensors of a GGUF file; CheckpointError for a truncated, corrupt or unsupported file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as err:
        raise CheckpointError(f"{path.name} is not a readable GGUF file (truncated or corrupt: "
                              f"{type(err).__name__}: {str(err)[:120]}). Download it again.") from err
    meta = _metadata(reader)
    tensors: dict[str, torch.Tensor | PackedTensor] = {}
    formats: dict[str, int] = {}
    for entry in reader.tensors:
        shape = tuple(int(n) for n in reversed(entry.shape.tolist()))
        original = meta.get(ORIG_SHAPE_KEY + entry.name)
        tensor = _tensor(entry, shape, path)
        if original is not None:
            tensor = tensor.reshape(tuple(int(n) for n in original))
        tensors[entry.name] = tensor
        formats[entry.tensor_type.name] = formats.get(entry.tensor_type.name, 0) + 1
    arch = meta.get("general.architecture")
    return GGUFContents(tensors, str(arch) if arch is not None else None, formats)
