"""Weights that stay packed in memory (GGUF blocks, fp8, bitsandbytes NF4 / FP4) and are restored one layer at a time.

A `PackedTensor` is what a reader returns for a quantized tensor: its raw storage (uint8
blocks or a float8 tensor), its format, its logical shape and an optional scale. Key
conversion may rename, reshape or split it along dim 0 on block boundaries without
unpacking anything.

`pack_weights(module, packed, compute_dtype)` puts packed tensors into a module as
parametrizations: the storage stays a (frozen) parameter, and every read of
`module.weight` restores it on the storage's device in the compute dtype, so a layer
upcasts per matmul and the model never holds a whole float copy. A weight delta (LoRA)
is set on the parametrization and added at restore time, and cleared to revert; the
packed storage is never written.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from modules.checkpoints import bnb4
from modules.checkpoints.quant import QuantType, dequantize, packed_bytes, quant_type
from modules.errors import CheckpointError

FP8_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class PackedTensor:
    """A tensor kept in its stored format: GGML blocks (uint8), float8 with an optional scale, or
    bitsandbytes 4-bit codes (uint8, two per byte) with their block scales in `bnb`."""

    storage: torch.Tensor
    format: str  # "Q8_0", "Q4_K", ... or "F8_E4M3" / "F8_E5M2"
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None  # fp8 files' per-tensor `scale_weight` / `weight_scale`
    bnb: bnb4.Bnb4State | None = None  # "NF4" / "FP4": the block scales

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def reshape(self, *shape: int) -> PackedTensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else tuple(shape)
        if _count(shape) != _count(self.shape):
            raise CheckpointError(f"cannot view a {self.format} tensor of shape {self.shape} as {shape}")
        return replace(self, shape=shape)

    def chunk(self, chunks: int, dim: int = 0) -> list[PackedTensor]:
        """Equal parts along dim 0 (fused q/k/v); each part must be whole blocks of whole rows."""
        if self.shape[0] % chunks:
            raise CheckpointError(f"cannot split {self.shape[0]} rows of a {self.format} tensor into {chunks}")
        return self.split(self.shape[0] // chunks, dim)

    def split(self, sizes: int | list[int], dim: int = 0) -> list[PackedTensor]:
        """Parts of `sizes` rows along dim 0 (FLUX's linear1: q, k, v and the MLP), on block boundaries."""
        if dim != 0:
            raise CheckpointError(f"a {self.format} tensor splits only along its rows")
        rows = self.shape[0]
        sizes = [sizes] * (rows // sizes) if isinstance(sizes, int) else list(sizes)
        if sum(sizes) != rows:
            raise CheckpointError(f"cannot split {rows} rows of a {self.format} tensor into {sizes}")
        parts, start = [], 0
        if self.bnb is not None:
            return self._split_bnb(sizes)
        if self.format in FP8_DTYPES:
            for n, part in zip(sizes, self.storage.reshape(self.shape).split(sizes), strict=True):
                parts.append(PackedTensor(part.contiguous(), self.format, (n, *self.shape[1:]), self.scale))
            return parts
        flat = self.storage.reshape(-1)
        for n in sizes:
            size = packed_bytes(quant_type(self.format), (n, *self.shape[1:]))  # whole blocks or raises
            parts.append(PackedTensor(flat[start:start + size], self.format, (n, *self.shape[1:])))
            start += size
        return parts

    def _split_bnb(self, sizes: list[int]) -> list[PackedTensor]:
        row, size = _count(self.shape[1:]), self.bnb.blocksize
        parts, start = [], 0
        for n in sizes:
            if start % size or (start + n * row < _count(self.shape) and (n * row) % size):
                raise CheckpointError(f"cannot split a {self.format} tensor of shape {self.shape} into "
                                      f"{sizes} rows: the parts do not end on {size}-element blocks")
            data = self.storage[start // 2:(start + n * row + 1) // 2]
            state = bnb4.slice_state(self.bnb, start // size, -(-(n * row) // size))
            parts.append(PackedTensor(data, self.format, (n, *self.shape[1:]), bnb=state))
            start += n * row
        return parts

    @staticmethod
    def cat(parts: list[PackedTensor]) -> PackedTensor:
        """Parts of one format joined along dim 0 (the reverse of `split`)."""
        first = parts[0]
        if any(p.format != first.format or p.shape[1:] != first.shape[1:] for p in parts):
            raise CheckpointError("packed tensors of different formats or widths cannot be joined")
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
        if first.bnb is not None:
            if any(_count(p.shape) % 2 or _count(p.shape) % p.bnb.blocksize for p in parts[:-1]):
                raise CheckpointError(f"{first.format} tensors that end inside a block cannot be joined")
            return PackedTensor(torch.cat([p.storage for p in parts]), first.format, shape,
                                bnb=bnb4.cat_states([p.bnb for p in parts]))
        if first.format in FP8_DTYPES:
            return PackedTensor(torch.cat([p.storage.reshape(p.shape) for p in parts]), first.format, shape,
                                first.scale)
        return PackedTensor(torch.cat([p.storage.reshape(-1) for p in parts]), first.format, shape)

    def restore(self, dtype: torch.dtype) -> torch.Tensor:
        """The float tensor, on the storage's device."""
        if self.bnb is not None:
            return bnb4.dequantize(self.storage, self.bnb, self.shape, dtype)
        if self.format in FP8_DTYPES:
            value = self.storage.reshape(self.shape).to(dtype)
            return value * self.scale.to(value.device, dtype) if self.scale is not None else value
        return dequantize(self.storage, quant_type(self.format), self.shape, dtype)


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def fp8_dtype(name: str) -> torch.dtype:
    """torch's float8 dtype for a format name; a clear error on a torch build without it."""
    dtype = getattr(torch, FP8_DTYPES[name], None)
    if dtype is None:
        raise CheckpointError(f"this torch ({torch.__version__}) has no {FP8_DTYPES[name]}; fp8 weights need "
                              "torch 2.1 or newer")
    return dtype


class RestorePacked(nn.Module):
    """The parametrization behind a packed weight: storage -> compute-dtype weight (+ delta)."""

    def __init__(self, packed: PackedTensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.format, self.shape, self.dtype = packed.format, packed.shape, dtype
        plain = packed.format in FP8_DTYPES or packed.bnb is not None
        self.qtype: QuantType | None = None if plain else quant_type(packed.format)
        self.register_buffer("scale", packed.scale, persistent=False)
        # a 4-bit weight's scales are buffers too (they move with the layer); `bnb` keeps the rest of its state
        scales = packed.bnb.tensors() if packed.bnb is not None else {}
        self.bnb = packed.bnb.with_tensors(dict.fromkeys(scales)) if packed.bnb is not None else None
        self.bnb_names = tuple(scales)
        for name, tensor in scales.items():
            self.register_buffer(f"bnb_{name}", tensor, persistent=False)
        # a LoRA's summed delta while a job is patched; a buffer, so it moves with the layer (memory policies)
        self.register_buffer("delta", None, persistent=False)

    def forward(self, storage: torch.Tensor) -> torch.Tensor:
        if self.bnb is not None:
            state = self.bnb.with_tensors({name: getattr(self, f"bnb_{name}") for name in self.bnb_names})
            weight = bnb4.dequantize(storage, state, self.shape, self.dtype)
        elif self.qtype is not None:
            weight = dequantize(storage, self.qtype, self.shape, self.dtype)
        else:
            weight = storage.reshape(self.shape).to(self.dtype)
            if self.scale is not None:
                weight = weight * self.scale.to(self.dtype)
        return weight if self.delta is None else weight + self.delta


def packed_weight(module: nn.Module, name: str = "weight") -> RestorePacked | None:
    """The module's RestorePacked parametrization of `name`, if it has one."""
    if not parametrize.is_parametrized(module, name):
        return None
    found = [p for p in getattr(module.parametrizations, name) if isinstance(p, RestorePacked)]
    return found[0] if found else None


def pack_weights(module: nn.Module, packed: dict[str, PackedTensor], dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
    """Put each `name -> PackedTensor` (module-relative parameter names) into `module` as packed storage,
    on `device` (default: where the parameter is; give it for a module built on the meta device)."""
    for name, tensor in packed.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor):
            raise CheckpointError(f"the model has no parameter {name} for a packed tensor")
        if tuple(current.shape) != tensor.shape:
            raise CheckpointError(f"{name}: the file's shape {tensor.shape} does not match the model's "
                                  f"{tuple(current.shape)}")
        where = current.device if device is None else device
        storage = tensor.storage.to(where)
        setattr(owner, attr, nn.Parameter(storage, requires_grad=False))
        restore = RestorePacked(replace(tensor, storage=storage), dtype).to(where)
        parametrize.register_parametrization(owner, attr, restore, unsafe=True)


def packed_bytes_in(module: nn.Module) -> int:
    """Bytes of packed storage held by `module` (for the model list and memory reports)."""
    total = 0
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for plist in sub.parametrizations.values():
                total += plist.original.numel() * plist.original.element_size()
    return total


def store_as_fp8(module: nn.Module, dtype: torch.dtype, fmt: str = "F8_E4M3") -> int:
    """A1111's "FP8 weight": every Linear and Conv weight of `module` kept as float8 (no scale),
    restored to `dtype` per layer. Returns the bytes saved."""
    storage_dtype = fp8_dtype(fmt)
    before = after = 0
    for owner in module.modules():
        if isinstance(owner, nn.Linear | nn.Conv2d) and packed_weight(owner) is None:
            weight = owner.weight.detach()
            stored = weight.to(storage_dtype)
            before += weight.numel() * weight.element_size()
            after += stored.numel()
            pack_weights(owner, {"weight": PackedTensor(stored, fmt, tuple(weight.shape))}, dtype)
    return before - after
