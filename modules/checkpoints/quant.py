"""GGML block quantization (the formats inside GGUF files), dequantized in torch.

Each format stores a tensor as blocks of bytes; a block holds `block_size` weights and the
scales to restore them. `dequantize(raw, qtype, shape)` turns a uint8 tensor of whole blocks
into floats on whatever device `raw` lives on, so weights can stay packed in memory and be
restored one layer at a time. The byte layouts are ggml's (`ggml-common.h`); the tests check
every format against the `gguf` package's numpy dequantizers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modules.errors import CheckpointError

QK_K = 256  # weights per k-quant super-block


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes start:start+2 of each block as a float16 scale, shape (n, 1), in float32."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): all low nibbles, then all high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """(n, k) bytes -> (n, count, k): bit b of every byte in row b."""
    shifts = torch.arange(count, device=packed.device, dtype=torch.uint8).view(1, count, 1)
    return (packed.unsqueeze(1) >> shifts) & 1


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """(n, ..., k) bytes -> (n, ..., 4, k): the 2-bit fields at shifts 0, 2, 4, 6."""
    shifts = torch.tensor([0, 2, 4, 6], device=packed.device, dtype=torch.uint8).view(4, 1)
    return (packed.unsqueeze(-2) >> shifts) & 3


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b, 0) * _nibbles(b[:, 4:]).float() + _half(b, 2)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """Four bytes (a little-endian uint32) -> (n, 32): bit i is weight i's fifth bit."""
    return _bits(qh, 8).transpose(1, 2).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits_32(b[:, 2:6]) << 4)
    return _half(b, 0) * (q.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits_32(b[:, 4:8]) << 4)
    return _half(b, 0) * q.float() + _half(b, 2)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, d, dmin = b[:, :16], _half(b, 80), _half(b, 82)
    q = _crumbs(b[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16).float()
    y = (d * (scales & 0x0F).float()).unsqueeze(-1) * q - (dmin * (scales >> 4).float()).unsqueeze(-1)
    return y.reshape(n, QK_K)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low nibbles in bytes 0-7, 2-bit tops in bytes 8-11."""
    low = _nibbles(packed[:, :8])
    top = _crumbs(packed[:, 8:12]).reshape(packed.shape[0], 16)
    return ((low | (top << 4)).to(torch.int16) - 32).float()


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, scales, d = b[:, :32], _q3_k_scales(b[:, 96:108]), _half(b, 108)
    low = _crumbs(b[:, 32:96].reshape(n, 2, 32)).reshape(n, 8, 32).to(torch.int16)
    q = (low - 4 * (1 - _bits(hmask, 8).to(torch.int16))).reshape(n, 16, 16).float()
    return ((d * scales).unsqueeze(-1) * q).reshape(n, QK_K)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 mins (Q4_K, Q5_K): sub-blocks 4-7 borrow top bits."""
    d_part, m_part, both = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d_part & 0x3F, (both & 0x0F) | ((d_part >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m_part & 0x3F, (both >> 4) | ((m_part >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> (n, 8, 32): each 32-byte chunk gives a sub-block of low, then one of high nibbles."""
    chunks = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).float()
    y = (_half(b, 0) * scales).unsqueeze(-1) * q - (_half(b, 2) * mins).unsqueeze(-1)
    return y.reshape(b.shape[0], QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = (_k_nibbles(b[:, 48:176]) | (_bits(b[:, 16:48], 8) << 4)).float()
    y = (_half(b, 0) * scales).unsqueeze(-1) * q - (_half(b, 2) * mins).unsqueeze(-1)
    return y.reshape(b.shape[0], QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 2, 32)  # half, -, which 32 bytes, byte
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    high = _crumbs(b[:, 128:192].reshape(n, 2, 32))
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return ((_half(b, 208) * scales).unsqueeze(-1) * q).reshape(n, QK_K)


@dataclass(frozen=True)
class QuantType:
    name: str
    block_size: int  # weights per block
    block_bytes: int
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor] | None  # None: a plain float type
    float_dtype: torch.dtype | None = None


QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in (
    QuantType("F32", 1, 4, None, torch.float32),
    QuantType("F16", 1, 2, None, torch.float16),
    QuantType("BF16", 1, 2, None, torch.bfloat16),
    QuantType("Q8_0", 32, 34, _q8_0),
    QuantType("Q4_0", 32, 18, _q4_0),
    QuantType("Q4_1", 32, 20, _q4_1),
    QuantType("Q5_0", 32, 22, _q5_0),
    QuantType("Q5_1", 32, 24, _q5_1),
    QuantType("Q2_K", QK_K, 84, _q2_k),
    QuantType("Q3_K", QK_K, 110, _q3_k),
    QuantType("Q4_K", QK_K, 144, _q4_k),
    QuantType("Q5_K", QK_K, 176, _q5_k),
    QuantType("Q6_K", QK_K, 210, _q6_k),
)}


def quant_type(name: str) -> QuantType:
    try:
        return QUANT_TYPES[name]
    except KeyError:
        known = ", ".join(QUANT_TYPES)
        raise CheckpointError(f"GGUF quantization {name} is not supported; Atelier reads {known}.") from None


def packed_bytes(qtype: QuantType, shape: tuple[int, ...]) -> int:
    """How many bytes `shape` takes in `qtype`; the weight count must fill whole blocks."""
    count = 1
    for size in shape:
        count *= size
    if count % qtype.block_size:
        raise CheckpointError(f"a {qtype.name} tensor of shape {tuple(shape)} does not fill whole "
                              f"{qtype.block_size}-weight blocks")
    return count // qtype.block_size * qtype.block_bytes


def dequantize(raw: torch.Tensor, qtype: QuantType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks -> a `dtype` tensor of `shape`, computed on raw's device."""
    flat = raw.reshape(-1)
    if flat.numel() != packed_bytes(qtype, shape):
        raise CheckpointError(f"a {qtype.name} tensor of shape {tuple(shape)} needs "
                              f"{packed_bytes(qtype, shape)} bytes, the file holds {flat.numel()}")
    if qtype.dequantize_blocks is None:
        return flat.view(qtype.float_dtype).reshape(shape).to(dtype)
    blocks = flat.reshape(-1, qtype.block_bytes)
    return qtype.dequantize_blocks(blocks).reshape(shape).to(dtype)
