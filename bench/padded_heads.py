"""SD 1.5 UNet with and without self-attention heads padded to 16 dims, timed in one process.

    .venv/bin/python bench/padded_heads.py [--rounds 12] [--size 512] [--mode frozen|compile|eager]
                                           [--out bench/padded-heads.json]

Two copies of the UNet (SD 1.5 widths, random weights, bf16, CFG batch 2) run side by side (frozen,
compiled or eager), one with `modules/sampling/padded_heads.py`'s processor on its 40-dim self-attention
layers. Their calls alternate in ABBA order, so a machine that speeds up or slows down over the run
weighs on both alike; the figure to quote is the median of the paired ratios. Separate processes (bench/cpu.py) swing
by more than the effect on a shared machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = REPO / "bench" / "cache" / "sd15-diffusers-config" / "unet"


def build_unets() -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    from modules.sampling.padded_heads import pad_self_attention_heads

    torch.manual_seed(0)
    plain = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG))
    plain = plain.to(torch.bfloat16).eval().requires_grad_(False)
    padded = copy.deepcopy(plain)
    print(f"padded self-attention layers: {pad_self_attention_heads(padded)}", flush=True)
    return {"plain": plain, "padded": padded}


def runner(unet: torch.nn.Module, mode: str):
    import torch._inductor.config as inductor

    call = unet if mode == "eager" else torch.compile(unet)

    def run(*args):
        with inductor.patch(freezing=mode == "frozen"):
            return call(*args).sample

    return run


def timed(run, inputs) -> float:
    began = time.perf_counter()
    run(*inputs)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--mode", choices=("frozen", "compile", "eager"), default="frozen")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "padded-heads.json")
    args = parser.parse_args()
    latent = args.size // 8
    inputs = (torch.randn(2, 4, latent, latent).bfloat16(), torch.tensor([500, 500]),
              torch.randn(2, 77, 768).bfloat16())
    with torch.inference_mode():
        runs = {name: runner(unet, args.mode) for name, unet in build_unets().items()}
        outputs = {}
        for name, run in runs.items():
            began = time.perf_counter()
            outputs[name] = run(*inputs).float()
            print(f"{name}: first call {time.perf_counter() - began:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            order = ("plain", "padded") if r % 2 == 0 else ("padded", "plain")
            for name in order:
                times[name].append(timed(runs[name], inputs))
    ratios = [p / q for p, q in zip(times["plain"], times["padded"], strict=True)]
    rms = (outputs["padded"] - outputs["plain"]).pow(2).mean().sqrt().item()
    report = {"mode": args.mode, "size": args.size, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
              "plain_over_padded": ratios, "median_plain_over_padded": statistics.median(ratios),
              "padded_faster_rounds": sum(x > 1 for x in ratios), "rms_padded_vs_plain": rms}
    print(json.dumps({k: v for k, v in report.items() if k != "times_s"}, indent=1))
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
