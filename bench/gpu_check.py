"""CUDA check of the engine on tiny checkpoints, for a lent GPU machine.

For every architecture: txt2img in fp16 (and bf16 for sd1) on CUDA, compared with fp32 on the
CPU from the same noise (PSNR); the NV RNG on the CPU against CUDA's own generator; and the
fp32 VAE fallback when a half-precision VAE returns NaNs. Prints a table and writes JSON.

    python bench/gpu_check.py --out gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.app import build_app  # noqa: E402
from modules.pipeline.params import Txt2ImgParams  # noqa: E402
from modules.settings import Settings  # noqa: E402
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

ARCHES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl")


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def engine(tmp: Path, ckpt: Path, device: str, precision: str):
    settings = Settings(data_dir=tmp / "data", outputs_dir=tmp / "out", device=device, precision=precision)
    eng = build_app(settings).engine
    eng.load_model(ckpt)
    return eng


def generate(eng, rng_source: str = "cpu", **kw):
    params = Txt2ImgParams(prompt="a red circle on a blue background", negative_prompt="green", steps=8,
                           sampler_name="Euler a", width=64, height=64, seed=42, rng_source=rng_source,
                           save_images=False, **kw)
    start = time.perf_counter()
    result = eng.txt2img(params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check_arch(tmp: Path, arch: str) -> dict:
    ckpt = make_tiny_checkpoint(arch, tmp / f"{arch}.safetensors")
    ref, _ = generate(engine(tmp, ckpt, "cpu", "fp32"))
    row = {"arch": arch}
    for precision in ("fp16", "bf16", "fp32"):
        eng = engine(tmp, ckpt, "cuda", precision)
        generate(eng)  # warm-up
        result, seconds = generate(eng)
        image = np.asarray(result.images[0])
        row[precision] = {"psnr_vs_cpu_fp32": round(psnr(image, ref.images[0]), 2), "seconds": round(seconds, 3),
                          "finite_and_not_blank": bool(image.std() > 0), "warnings": result.warnings,
                          "attention": eng.devices.attention}
    return row


def check_nv(tmp: Path) -> dict:
    ckpt = make_tiny_checkpoint("sd1", tmp / "sd1.safetensors")
    cpu_nv, _ = generate(engine(tmp, ckpt, "cpu", "fp32"), rng_source="nv")
    cuda_gpu, _ = generate(engine(tmp, ckpt, "cuda", "fp32"), rng_source="gpu")
    return {"psnr_cpu_nv_vs_cuda_gpu": round(psnr(cpu_nv.images[0], cuda_gpu.images[0]), 2)}


def check_nan_fallback(tmp: Path) -> dict:
    ckpt = make_tiny_checkpoint("sd1", tmp / "sd1.safetensors")
    eng = engine(tmp, ckpt, "cuda", "fp16")
    vae = eng.require_model().vae
    vae.decoder.conv_out.weight.data *= 1e6  # overflows fp16's range (65504), finite in fp32
    result, _ = generate(eng)
    return {"warnings": result.warnings, "vae_dtype_after": str(next(vae.parameters()).dtype)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        report["arches"] = [check_arch(Path(tmp), arch) for arch in ARCHES]
        report["nv_rng"] = check_nv(Path(tmp))
        report["nan_fallback"] = check_nan_fallback(Path(tmp))
    print(f"{'arch':12} {'fp16 PSNR':>10} {'bf16 PSNR':>10} {'fp32 PSNR':>10}  (dB vs CPU fp32; seconds for 8 steps)")
    for row in report["arches"]:
        cells = [f"{row[p]['psnr_vs_cpu_fp32']:>6} {row[p]['seconds']:.2f}s" for p in ("fp16", "bf16", "fp32")]
        print(f"{row['arch']:12} " + " ".join(cells))
    print(json.dumps({k: report[k] for k in ("torch", "device", "nv_rng", "nan_fallback")}, indent=1))
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
