"""SDE-sampler noise: A1111's seeded Brownian trees (torchsde) against sequential per-image draws.

    .venv/bin/python bench/sde_noise.py [--steps 20] [--repeats 3] [--device cpu] [--out bench/sde-noise-cpu.json]

Times only the noise: the draws that one DPM++ 2M SDE pass makes (one per step) for SD 1.5
(4x64x64) and SDXL (4x128x128) latents at batch 1 and 4, both modes side by side in one run
(median of the repeats). Compare the per-step cost with a UNet step on the same device.
Prints a table and the ratio; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modules.sampling.noise import BrownianTreeNoise  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_brownian(shape, seeds, sigmas, device) -> float:
    x = torch.zeros(shape, device=device)
    sync(device)
    start = time.perf_counter()
    tree = BrownianTreeNoise(x, sigmas[-1], sigmas[0], seeds)
    for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        tree(a, b)
    sync(device)
    return time.perf_counter() - start


def time_sequential(shape, seeds, sigmas, device) -> float:
    sync(device)
    start = time.perf_counter()
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    for _ in sigmas[:-1]:
        torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in gens])
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "sde-noise-cpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    sigmas = torch.exp(torch.linspace(torch.log(torch.tensor(14.6, dtype=torch.float64)),
                                      torch.log(torch.tensor(0.03, dtype=torch.float64)), args.steps + 1)).tolist()
    rows = []
    for latent, size in (("sd15", 64), ("sdxl", 128)):
        for batch in (1, 4):
            shape, seeds = (batch, 4, size, size), list(range(batch))
            result = {}
            for mode, fn in (("brownian", time_brownian), ("sequential", time_sequential)):
                fn(shape, seeds, sigmas, device)  # warm-up
                result[mode] = statistics.median(fn(shape, seeds, sigmas, device) for _ in range(args.repeats))
            rows.append({"latent": latent, "batch": batch, "steps": args.steps, **result,
                         "brownian_ms_per_step": 1000 * result["brownian"] / args.steps,
                         "ratio": result["brownian"] / result["sequential"]})
    print(f"device {device}, {args.steps} steps, median of {args.repeats}")
    print(f"{'latent':8}{'batch':>6}{'brownian s':>12}{'sequential s':>14}{'ms/step':>9}{'ratio':>8}")
    for r in rows:
        print(f"{r['latent']:8}{r['batch']:>6}{r['brownian']:>12.4f}{r['sequential']:>14.4f}"
              f"{r['brownian_ms_per_step']:>9.2f}{r['ratio']:>8.1f}")
    args.out.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
