"""GGUF files and fp8 weights kept packed in a model: read by modules/checkpoints/gguf_file.py
(files written here with the `gguf` package's writer and quantizer, independent of the reader),
restored per layer on forward, and patched by a LoRA-style delta that reverts bit-exactly."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from torch import nn

from modules.checkpoints.gguf_file import read_gguf
from modules.checkpoints.packed import (
    PackedTensor,
    pack_weights,
    packed_bytes_in,
    packed_weight,
    store_as_fp8,
)
from modules.errors import CheckpointError
from modules.plugins.patch import ModelPatch
from tests.fixtures.make_tiny_gguf import finish


class Tiny(nn.Module):
    """A linear and a 3x3 conv: the two layer kinds whose weights GGUF UNets and transformers pack."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, 64)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)  # 32*3*3 = 288 weights a row: whole 32-blocks

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.conv(image)


def float_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"proj.weight": rng.standard_normal((64, 256)).astype(np.float32) * 0.05,
            "proj.bias": rng.standard_normal(64).astype(np.float32),
            "conv.weight": rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.05,
            "conv.bias": rng.standard_normal(32).astype(np.float32)}


def write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: str, arch: str = "sdxl") -> Path:
    """Weights (2-D and up) quantized with gguf's own quantizer; biases stay F32, as ComfyUI-GGUF does."""
    writer = GGUFWriter(str(path), arch)
    for name, value in weights.items():
        if value.ndim == 1:
            writer.add_tensor(name, value)
            continue
        rows = value.reshape(value.shape[0], -1)
        packed = quants.quantize(rows, GGMLQuantizationType[qtype])
        writer.add_tensor(name, packed, raw_dtype=GGMLQuantizationType[qtype])  # shape in bytes per row
        if value.ndim > 2:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(value.shape))
    finish(writer)
    return path


def reference(weights: dict[str, np.ndarray], qtype: str) -> dict[str, torch.Tensor]:
    """What the weights are after gguf's quantize + dequantize."""
    out = {}
    for name, value in weights.items():
        if value.ndim == 1:
            out[name] = torch.from_numpy(value)
            continue
        rows = value.reshape(value.shape[0], -1)
        packed = quants.quantize(rows, GGMLQuantizationType[qtype])
        out[name] = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType[qtype])).reshape(value.shape)
    return out


def packed_model(contents) -> Tiny:
    model = Tiny()
    plain = {k: v for k, v in contents.tensors.items() if isinstance(v, torch.Tensor)}
    model.load_state_dict(plain, strict=False)
    pack_weights(model, {k: v for k, v in contents.tensors.items() if isinstance(v, PackedTensor)},
                 torch.float32)
    return model


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_gguf_file_reads_and_runs_packed(tmp_path, qtype):
    weights = float_weights()
    contents = read_gguf(write_gguf(tmp_path / f"tiny-{qtype}.gguf", weights, qtype))
    assert contents.architecture == "sdxl" and contents.weight_format == qtype
    assert contents.tensors["conv.weight"].shape == (32, 32, 3, 3)  # the orig_shape metadata
    model = packed_model(contents)
    expected = Tiny()
    expected.load_state_dict(reference(weights, qtype))
    x, image = torch.randn(2, 256), torch.randn(1, 32, 8, 8)
    for got, want in zip(model(x, image), expected(x, image), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert packed_bytes_in(model) < 0.6 * 4 * (64 * 256 + 32 * 32 * 9)  # stays packed, not float32


def test_a_delta_on_packed_weights_changes_the_output_and_reverts_exactly(tmp_path):
    model = packed_model(read_gguf(write_gguf(tmp_path / "tiny.gguf", float_weights(), "Q8_0")))
    holder = SimpleNamespace(spec=SimpleNamespace(arch="sdxl", text_encoders=[]), unet=model, text_encoders=[])
    x, image = torch.randn(2, 256), torch.randn(1, 32, 8, 8)
    before = model(x, image)
    storage = model.proj.parametrizations.weight.original.clone()
    patch = ModelPatch(holder)
    patch.add("unet", "proj", torch.full((64, 256), 0.01))
    patch.add("unet", "conv", lambda w: 0.5 * w)
    with patch.applied():
        during = model(x, image)
        assert packed_weight(model.proj).delta is not None
        torch.testing.assert_close(model.conv.weight, 1.5 * before_weight(model.conv, patch), rtol=1e-6, atol=1e-7)
    after = model(x, image)
    assert not torch.allclose(during[0], before[0]) and not torch.allclose(during[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert torch.equal(model.proj.parametrizations.weight.original, storage)  # the packed bytes were never written


def before_weight(module: nn.Module, patch: ModelPatch) -> torch.Tensor:
    delta, packed_weight(module).delta = packed_weight(module).delta, None
    try:
        return module.weight
    finally:
        packed_weight(module).delta = delta


@pytest.mark.parametrize("fmt", ["F8_E4M3", "F8_E5M2"])
def test_fp8_weights_stay_fp8_and_upcast_per_layer(fmt):
    dtype = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[fmt]
    weight = torch.randn(64, 256) * 0.05
    scale = torch.tensor(0.5)
    stored = (weight / scale).to(dtype)
    model = Tiny()
    pack_weights(model, {"proj.weight": PackedTensor(stored, fmt, (64, 256), scale)}, torch.bfloat16)
    assert model.proj.parametrizations.weight.original.dtype == dtype
    assert model.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.proj.weight.float(), stored.float() * 0.5, rtol=1e-2, atol=1e-3)


def test_packed_tensors_split_on_block_boundaries():
    rows = np.arange(6 * 64, dtype=np.float32).reshape(6, 64) / 100
    packed = quants.quantize(rows, GGMLQuantizationType.Q8_0)
    whole = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q8_0))
    raw = torch.from_numpy(packed.view(np.uint8))
    q, k, v = PackedTensor(raw.reshape(-1), "Q8_0", (6, 64)).chunk(3)
    assert q.shape == (2, 64) and torch.equal(v.restore(torch.float32), whole[4:])
    with pytest.raises(CheckpointError, match="cannot split 6 rows"):
        PackedTensor(raw.reshape(-1), "Q8_0", (6, 64)).chunk(4)


def test_truncated_and_mismatched_files_are_clear_errors(tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", float_weights(), "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf(cut)
    contents = read_gguf(path)
    wrong = {"proj.weight": contents.tensors["proj.weight"].reshape(128, 128)}
    with pytest.raises(CheckpointError, match="proj.weight: the file's shape"):
        pack_weights(Tiny(), wrong, torch.float32)


def test_store_as_fp8_keeps_every_layer_fp8_and_close_to_the_original():
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    x, image = torch.randn(2, 256, dtype=torch.bfloat16), torch.randn(1, 32, 8, 8, dtype=torch.bfloat16)
    before = model(x, image)
    saved = store_as_fp8(model, torch.bfloat16)
    assert saved == (64 * 256 + 32 * 32 * 9) * (2 - 1)  # bf16 -> fp8: one byte per weight
    assert model.conv.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    after = model(x, image)
    for a, b in zip(after, before, strict=True):  # e4m3 keeps 3 mantissa bits: ~6% per weight, averaging out
        assert (a.float() - b.float()).abs().mean() < 0.05 * b.float().abs().mean()
