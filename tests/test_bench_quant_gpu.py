"""bench/quant_gpu.py: its torch quantizers against independent ones, and its whole run in tiny CPU mode
(so the prepared GPU benchmark cannot rot while no GPU is lent)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import quant_gpu
from modules.checkpoints import bnb4

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402


def _rows(cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 0.05, size=(8, cols)).astype(np.float32)
    rows[0, :32] = 0  # an all-zero block (d = 0)
    rows[1, :256] += 0.3  # a block whose minimum is above zero
    return rows


def _torch_blocks(fmt: str, rows: np.ndarray) -> np.ndarray:
    block, quantize = quant_gpu.GGML[fmt]
    return quantize(torch.from_numpy(rows).reshape(-1, block)).numpy().reshape(rows.shape[0], -1)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_0"])
def test_block_quantizers_equal_gguf(fmt):
    rows = _rows(512)
    expected = quants.quantize(rows, GGMLQuantizationType[fmt])
    np.testing.assert_array_equal(_torch_blocks(fmt, rows), expected)


def test_q4_k_equals_the_fixture_quantizer():
    from tests.fixtures.make_tiny_gguf import quantize_q4_k

    rows = _rows(512)
    np.testing.assert_array_equal(_torch_blocks("Q4_K", rows), quantize_q4_k(rows))


def test_q5_k_restores_within_its_step_by_gguf():
    """gguf-py cannot quantize Q5_K; its dequantizer reads ours back within half a 5-bit step (plus the
    float16 rounding of the scales), at under 60% of Q4_K's error."""
    rows = _rows(1024)
    errors = {}
    for fmt in ("Q5_K", "Q4_K"):
        restored = quants.dequantize(_torch_blocks(fmt, rows), GGMLQuantizationType[fmt])
        errors[fmt] = np.abs(restored - rows)
    sub = rows.reshape(-1, 32)
    step = (sub.max(1) - np.minimum(sub.min(1), 0)) / 31
    bound = 0.5 * step + 0.08 * step + 1e-6  # 6-bit sub-block scales round the step by up to 1/126 of the range
    assert (errors["Q5_K"].reshape(-1, 32) <= bound[:, None] * 2).all()
    assert math.sqrt((errors["Q5_K"] ** 2).mean()) < 0.6 * math.sqrt((errors["Q4_K"] ** 2).mean())


def test_nf4_codes_match_bitsandbytes_and_restore():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.from_numpy(_rows(1024)).reshape(64, 128)
    data, state = quant_gpu.quantize_nf4(weight)
    codes, bnb_state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    same = (data == codes.reshape(-1)).float().mean().item()
    assert same > 0.995, f"only {same:.3f} of the NF4 code bytes equal bitsandbytes'"
    ours = bnb4.dequantize(data, state, tuple(weight.shape), torch.float32)
    theirs = functional.dequantize_4bit(codes, bnb_state)
    err_ours, err_theirs = (ours - weight).pow(2).mean().sqrt(), (theirs - weight).pow(2).mean().sqrt()
    assert err_ours < 1.05 * err_theirs  # the nested (double-quantized) scales add almost nothing


@pytest.mark.slow
def test_tiny_run_writes_every_format_row(tmp_path):
    out = tmp_path / "quant-gpu.json"
    quant_gpu.main(["--tiny", "--steps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["format"]: r for r in result["rows"]}
    assert list(rows) == list(quant_gpu.FORMATS)
    for fmt, row in rows.items():
        assert "skipped" not in row, row
        assert row["finite"], fmt
        for key in ("s_per_step", "weights_gib", "host_rss_gib"):
            assert math.isfinite(row[key]) and row[key] > 0, (fmt, key)
        if fmt != "bf16":
            assert math.isfinite(row["psnr_vs_bf16_db"]), fmt
            assert row["weights_gib"] < rows["bf16"]["weights_gib"], fmt
    # bounds: Q8_0's 1/254-of-block-max steps keep it far above the 4-bit formats on the tiny model
    assert rows["Q8_0"]["psnr_vs_bf16_db"] > 45
    assert min(rows[f]["psnr_vs_bf16_db"] for f in ("Q4_K", "NF4", "Q5_0", "Q5_K", "fp8_e4m3fn")) > 28
    assert rows["Q8_0"]["psnr_vs_bf16_db"] > rows["Q4_K"]["psnr_vs_bf16_db"] > rows["NF4"]["psnr_vs_bf16_db"]
    low = rows["Q4_K-low"]
    assert low["psnr_vs_bf16_db"] == rows["Q4_K"]["psnr_vs_bf16_db"]  # streaming moves weights, not values
    assert low["budget_gib"] == pytest.approx(8.0 - 0.5 - 2.0)
    assert set(result["summary"]) >= {"q8_0_x_bf16_time", "q8_0_goal_1.25x_met"}


def test_budget_skips_the_remaining_rows(tmp_path):
    out = tmp_path / "quant-gpu.json"
    quant_gpu.main(["--tiny", "--steps", "1", "--formats", "bf16,Q8_0", "--budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["format"] for r in rows] == ["bf16", "Q8_0"]
    assert all("time budget" in r["skipped"] for r in rows)


@pytest.mark.slow
def test_a_failing_row_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(weight, fmt):
        raise RuntimeError(f"no {fmt} kernel")

    monkeypatch.setattr(quant_gpu, "pack_tensor", broken)
    out = tmp_path / "quant-gpu.json"
    quant_gpu.main(["--tiny", "--steps", "1", "--formats", "bf16,Q8_0,fp8_e4m3fn", "--out", str(out)])
    rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["Q8_0"]["error"] == "RuntimeError: no Q8_0 kernel"
    assert math.isfinite(rows["bf16"]["s_per_step"]) and math.isfinite(rows["fp8_e4m3fn"]["psnr_vs_bf16_db"])
