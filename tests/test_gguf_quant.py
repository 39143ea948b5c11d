"""GGML block formats dequantized in torch (modules/checkpoints/quant.py) against the `gguf`
package's numpy dequantizers: bit-exact, for blocks from gguf's own quantizer where it has one
and for random blocks (every bit pattern is a valid block once its float16 scales are finite)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from modules.checkpoints.quant import QUANT_TYPES, dequantize, packed_bytes, quant_type
from modules.errors import CheckpointError

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"]  # gguf.quants.quantize has these
# Where each format keeps its float16 scales (byte offsets in a block): random bytes there could be inf/NaN.
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
                 "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, blocks: int, seed: int) -> np.ndarray:
    size = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scale = rng.uniform(-2, 2, size=blocks).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(blocks, 2)
    return raw


def test_the_table_matches_ggml_block_sizes():
    for name, qtype in QUANT_TYPES.items():
        assert (qtype.block_size, qtype.block_bytes) == GGML_QUANT_SIZES[GGMLQuantizationType[name]], name


@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_blocks_dequantize_exactly_as_gguf(name, seed):
    raw = random_blocks(name, blocks=24, seed=seed)
    qtype = quant_type(name)
    shape = (24 * qtype.block_size // 64, 64)
    expected = quants.dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
    got = dequantize(torch.from_numpy(raw), qtype, shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_weights_dequantize_exactly_as_gguf(name):
    weights = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    packed = quants.quantize(weights, GGMLQuantizationType[name])
    expected = quants.dequantize(packed, GGMLQuantizationType[name]).astype(np.float32)
    got = dequantize(torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8)), quant_type(name), (16, 256))
    np.testing.assert_array_equal(got.numpy(), expected)
    error = np.abs(got.numpy() - weights).mean() / np.abs(weights).mean()
    assert error < {"Q8_0": 0.01, "BF16": 0.01, "F16": 0.001}.get(name, 0.15), error  # a sane quantizer round trip


def test_dequantize_gives_the_compute_dtype_on_the_raw_device():
    raw = torch.from_numpy(random_blocks("Q4_K", 2, 0))
    got = dequantize(raw, quant_type("Q4_K"), (2, 256), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.device == raw.device


def test_bad_sizes_and_unknown_types_are_clear_errors():
    with pytest.raises(CheckpointError, match="IQ4_XS is not supported; Atelier reads F32"):
        quant_type("IQ4_XS")
    with pytest.raises(CheckpointError, match="does not fill whole 256-weight blocks"):
        packed_bytes(quant_type("Q6_K"), (3, 100))
    with pytest.raises(CheckpointError, match="needs 420 bytes, the file holds 210"):
        dequantize(torch.zeros(210, dtype=torch.uint8), quant_type("Q6_K"), (2, 256))
