"""Quantized weights on the CPU: per format, seconds per denoiser step, resident memory and PSNR against bf16.

    .venv/bin/python bench/quant.py [--repeats 2] [--out bench/quant-cpu.json] [--sdxl]

Two random-weight models run one denoiser step each (no text encoders, no VAE):
- a tiny-wide FLUX.1 transformer (hidden 256, 2 double + 2 single blocks) on 32x32 latents (256 tokens);
- with --sdxl, an SDXL-width UNet (SDXL's 320/640/1280 channels and 2048-wide context; one res block
  and one transformer layer per level instead of 2 and 2/10) on 32x32 latents: minutes on a busy CPU.
Formats: float (bf16-rounded weights in the compute dtype: the reference), fp8 (e4m3, A1111's "FP8 weight"), GGUF Q8_0, Q5_0 and Q4_K, each packed
with gguf's quantizer (Q4_K with the test fixture's, checked against gguf's dequantizer) and run
through Atelier's packed weights (compute fp32 by default; bf16 with --compute bf16). NF4 and FP4 (Forge's
bnb-nf4 files: every Linear 4-bit, double-quantized scales, convolutions bf16) are quantized by bitsandbytes
and dequantized by Atelier's torch code; they are listed as skipped without bitsandbytes.
PSNR compares the step's output with the float output over the output's range. Weights MiB is what the
packed model holds; peak RSS is the process's resident high-water mark above the start of that row.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.checkpoints.packed import PackedTensor, pack_weights, packed_bytes_in, store_as_fp8  # noqa: E402

FORMATS = ("float", "fp8_e4m3fn", "Q8_0", "Q5_0", "Q4_K", "NF4", "FP4")
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """The highest resident size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def flux_model() -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                   pooled_projection_dim=256, guidance_embeds=False, axes_dims_rope=(8, 28, 28))
    tokens = 256
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    inputs = {"hidden_states": torch.randn(1, tokens, 64), "encoder_hidden_states": torch.randn(1, 32, 256),
              "pooled_projections": torch.randn(1, 256), "timestep": torch.tensor([0.5]),
              "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(32, 3)}
    return model, inputs


def sdxl_width_unet() -> tuple[torch.nn.Module, dict]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    inputs = {"sample": torch.randn(1, 4, 32, 32), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 77, 2048),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}}
    return model, inputs


def _quantize(rows: np.ndarray, fmt: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if fmt == "Q4_K":
        from tests.fixtures.make_tiny_gguf import quantize_q4_k

        return quantize_q4_k(rows)
    return quants.quantize(rows, GGMLQuantizationType[fmt])


def pack_gguf(model: torch.nn.Module, fmt: str, dtype: torch.dtype) -> None:
    """Every Linear / Conv weight whose rows fill whole blocks, as GGUF blocks (the rest stays bf16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]][0]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            weight = module.weight.detach().float()
            rows = weight.reshape(weight.shape[0], -1).numpy()
            if rows.shape[1] % block:
                continue
            raw = torch.from_numpy(_quantize(rows, fmt).reshape(-1).copy())
            pack_weights(module, {"weight": PackedTensor(raw, fmt, tuple(weight.shape))}, dtype)


def pack_bnb4(model: torch.nn.Module, fmt: str, dtype: torch.dtype) -> None:
    """Every Linear weight as bitsandbytes 4-bit (as Forge saves them), restored by Atelier per layer."""
    from bitsandbytes.functional import quantize_4bit

    from modules.checkpoints.quantized import pack_bnb

    qtype = fmt.lower()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            codes, state = quantize_4bit(module.weight.detach(), blocksize=64, compress_statistics=True,
                                         quant_type=qtype)
            sd = {"w": codes, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
            meta = json.loads(bytes(sd.pop(f"w.quant_state.bitsandbytes__{qtype}").tolist()))
            pack_weights(module, {"weight": pack_bnb(sd, {"w": {**meta, "quant_type": qtype}})["w"]}, dtype)


def build(maker, fmt: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The model with bf16-rounded weights (as checkpoints ship), computing in `dtype`, stored as `fmt`."""
    model, inputs = maker()
    model = model.to(torch.bfloat16).to(dtype).eval().requires_grad_(False)
    if fmt == "fp8_e4m3fn":
        store_as_fp8(model, dtype)
    elif fmt.startswith("Q"):
        pack_gguf(model, fmt, dtype)
    elif fmt in ("NF4", "FP4"):
        pack_bnb4(model, fmt, dtype)
    return model, inputs


def run_step(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep",)
            else v for k, v in inputs.items()}
    if "added_cond_kwargs" in cast:
        cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cast["added_cond_kwargs"].items()}
    with torch.inference_mode():
        return model(**cast, return_dict=False)[0].float()


def weight_bytes(model: torch.nn.Module) -> int:
    packed = packed_bytes_in(model)
    plain = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "parametrizations" not in n)
    return packed + plain


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out - ref) ** 2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * np.log10(span**2 / mse)


def measure(label: str, maker, fmt: str, repeats: int, ref: torch.Tensor | None, dtype: torch.dtype) -> dict:
    if fmt in ("NF4", "FP4") and importlib.util.find_spec("bitsandbytes") is None:
        return {"model": label, "format": fmt, "skipped": "bitsandbytes (the quantizer here) is not installed"}
    with PeakRSS() as rss:
        model, inputs = build(maker, fmt, dtype)
        out = run_step(model, inputs, dtype)  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            out = run_step(model, inputs, dtype)
            times.append(time.perf_counter() - began)
    row = {"model": label, "format": fmt, "s_per_step": round(min(times), 4),
           "weights_mib": round(weight_bytes(model) / 2**20, 1),
           "peak_rss_mib": round((rss.peak - rss.start) / 2**20, 1),
           "psnr_vs_float_db": None if ref is None else round(psnr(out, ref), 1)}
    del model
    return row | {"output": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compute", choices=COMPUTE, default="fp32",
                    help="compute dtype (bf16 matmuls are slow on CPUs without AVX512-BF16 / AMX)")
    ap.add_argument("--sdxl", action="store_true", help="also the SDXL-width UNet (slow on a CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("quant-cpu.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    models = [("flux tiny-wide (hidden 256)", flux_model)]
    if args.sdxl:
        models.append(("SDXL-width UNet (1 block/level)", sdxl_width_unet))
    dtype = COMPUTE[args.compute]
    rows = []
    began = time.perf_counter()
    for label, maker in models:
        run_step(*build(maker, "float", dtype), dtype)  # imports and first-call allocations, not measured
        ref = None
        for fmt in FORMATS:
            row = measure(label, maker, fmt, args.repeats, ref, dtype)
            if fmt == "float":
                ref = row["output"]
            row.pop("output", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["model"]: r["s_per_step"] for r in rows if r["format"] == "float"}
    for r in rows:
        if "s_per_step" in r:
            r["x_float_time"] = round(r["s_per_step"] / base[r["model"]], 2)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "compute": f"{args.compute}, CPU; 'float' = bf16-rounded weights held in {args.compute}", "repeats": args.repeats,
              "wall_s": round(time.perf_counter() - began, 1), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\n{'model':34} {'format':11} {'s/step':>8} {'x float':>7} {'weights MiB':>12} {'peak RSS MiB':>13} "
          f"{'PSNR dB':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:34} {r['format']:11} skipped: {r['skipped']}")
        else:
            print(f"{r['model']:34} {r['format']:11} {r['s_per_step']:8.3f} {r['x_float_time']:7.2f} "
                  f"{r['weights_mib']:12.1f} {r['peak_rss_mib']:13.1f} {str(r['psnr_vs_float_db']):>8}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
