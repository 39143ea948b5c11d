"""ControlNet overhead per sampling step on the CPU, against the same step without it, side by side.

    .venv/bin/python bench/controlnet.py [--size 512] [--repeats 3] [--dtype fp32] [--json out.json]

Builds an SD 1.5-width UNet and a ControlNet of the same widths (random weights; speed does not
depend on them) and times one guided step (CFG batch 2) through the engine's `ModelDenoiser`:
plain, and with a `unet_residuals` function that runs the ControlNet on a canny hint (the
extension's `control.Residuals`). Also times the canny preprocessor, which runs once per job.
Prints a table and writes JSON. Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extensions.controlnet import preprocessors  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.sampling.denoisers import ModelDenoiser  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def reference_patch(side: int) -> api.HiddenStatesPatch:
    """The extension's reference_only patch over a random reference latent, at step 0 of 20."""
    from types import SimpleNamespace

    from extensions.controlnet.control import Planned
    from extensions.controlnet.reference import ReferencePatch
    from extensions.controlnet.units import Unit

    unit = Unit(module="reference_only", threshold_a=0.5)
    planned = [Planned(0, unit, None, preprocessors.find("reference_only"))]
    context = SimpleNamespace(sigmas=torch.linspace(14.6, 0.0, 21), arch="sd1", pass_name="first", step=0)
    return ReferencePatch(planned, [torch.randn(1, 4, side, side)], context, seed=0).patch()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--reference", action="store_true", help="also time a reference_only unit (no model)")
    args = parser.parse_args(argv)
    from diffusers import ControlNetModel, UNet2DConditionModel

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(dtype).eval().requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet).to(dtype).eval().requires_grad_(False)
    side = args.size // 8
    x = torch.randn(2, 4, side, side)
    sigma = torch.full((2,), 5.0)
    cross = torch.randn(2, 77, 768)
    picture = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    pre_time = best(lambda: preprocessors.canny(picture, 100, 200), args.repeats)
    hint = torch.from_numpy(preprocessors.canny(picture, 100, 200)).permute(2, 0, 1)[None].float() / 255

    def residuals(call: api.UNetCall) -> api.UNetResiduals:
        down, mid = controlnet(call.model_in, call.timestep, encoder_hidden_states=call.cross_attn,
                               controlnet_cond=hint.to(dtype).expand(call.x.shape[0], -1, -1, -1), return_dict=False)
        return api.UNetResiduals(down=tuple(down), mid=mid)

    def sigma_to_t(s: torch.Tensor) -> torch.Tensor:
        return torch.full_like(s, 500.0)

    plain = ModelDenoiser(unet, sigma_to_t)
    controlled = ModelDenoiser(unet, sigma_to_t, residuals=residuals)
    models = [("without ControlNet", plain), ("with ControlNet", controlled)]
    if args.reference:
        models.append(("with reference_only", ModelDenoiser(unet, sigma_to_t, hidden_states=reference_patch(side))))
    with torch.inference_mode():
        times = {}
        for _ in range(2):  # alternate, so all see the same machine load
            for name, model in models:
                t = best(lambda m=model: m(x, sigma, cross), args.repeats)
                times[name] = min(t, times.get(name, t))
    ratio = times["with ControlNet"] / times["without ControlNet"]
    ratios = {name: value / times["without ControlNet"] for name, value in times.items()}
    report = {"size": args.size, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "step_s": times, "overhead_ratio": ratio, "ratios": ratios, "canny_preprocess_s": pre_time,
              "preprocess_vs_step": pre_time / times["with ControlNet"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"ControlNet per-step overhead, SD 1.5 widths, {args.size}x{args.size}, CFG batch 2, {args.dtype}, "
          f"{report['threads']} threads")
    print(f"{'':24}{'s / step':>10}")
    for name, value in times.items():
        print(f"{name:24}{value:10.3f}{ratios[name]:8.2f}x")
    print(f"{'ratio':24}{ratio:10.2f}x  (goal <= 1.45x)")
    print(f"canny preprocess (once per job): {pre_time:.3f} s; peak RSS {report['peak_rss_mb']:.0f} MB")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
