"""Tiny FLUX.1 / SD3.5 sampling: Atelier's flow denoiser + Euler against diffusers' pipelines, side by side.

    .venv/bin/python bench/flow.py [--size 256] [--steps 8] [--repeats 3] [--json bench/flow.json]

Both sides use the same transformer module, text states and noise; timed alternately in one run.
Prints s/step (median over repeats), time to first step, and the process's peak RSS after each side.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.sampling import flow  # noqa: E402
from modules.sampling.denoisers import CFGDenoiser, Cond  # noqa: E402
from modules.sampling.samplers import sample_euler  # noqa: E402
from tests.conftest import make_engine  # noqa: E402
from tests.fixtures.make_tiny_mmdit import make_all_in_one  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def atelier(model, pos, neg, noise, sigmas, cfg: float) -> tuple[float, float]:
    inner = flow.FlowDenoiser(model.unet, guidance=3.5)
    den = CFGDenoiser(inner, [[([(99, Cond(pos.cross_attn, pos.pooled))], 1.0)]],
                      [[(99, Cond(neg.cross_attn, neg.pooled))]], cfg)
    stamps = []
    start = time.perf_counter()
    with torch.inference_mode():
        sample_euler(den, noise, torch.cat([sigmas, torch.zeros(1)]), extra_args={}, disable=True,
                     callback=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - start, (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def diffusers_side(model, pos, neg, noise, sigmas, cfg: float, size: int) -> tuple[float, float]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    stamps = []

    def on_step(pipe, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    common = dict(sigmas=sigmas.tolist(), num_inference_steps=len(sigmas), height=size, width=size,
                  output_type="latent", callback_on_step_end=on_step)
    if model.spec.family.transformer == "flux":
        pipe = FluxPipeline(scheduler=sched, vae=model.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model.unet)
        args = dict(prompt_embeds=pos.cross_attn, pooled_prompt_embeds=pos.pooled, guidance_scale=3.5,
                    latents=flow.pack_latents(noise))
    else:
        pipe = StableDiffusion3Pipeline(transformer=model.unet, scheduler=sched, vae=model.vae, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
        args = dict(prompt_embeds=pos.cross_attn, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.cross_attn,
                    negative_pooled_prompt_embeds=neg.pooled, guidance_scale=cfg, latents=noise)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(**args, **common)
    return stamps[0] - start, (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(Path(tmp))
        for kind, cfg in (("flux-dev", 1.0), ("sd35-medium", 4.5)):
            model = engine.load_model(make_all_in_one(kind, Path(tmp) / f"{kind}.safetensors"))
            text = engine.text_conditioner(model)
            pos, neg = text.encode(["a fox in the snow"]), text.encode([""])
            lat = args.size // 8
            noise = torch.randn(1, 16, lat, lat, generator=torch.Generator().manual_seed(0))
            shift = flow.job_shift(model.spec.family, args.size, args.size, None)
            sigmas = flow.shift_sigma(torch.linspace(1.0, 1.0 / args.steps, args.steps, dtype=torch.float64),
                                      shift).float()
            runs: dict[str, list[tuple[float, float]]] = {"atelier": [], "diffusers": []}
            for _ in range(args.repeats):  # alternate the sides so drift hits both
                runs["atelier"].append(atelier(model, pos, neg, noise, sigmas, cfg))
                rss_a = peak_rss_mib()
                runs["diffusers"].append(diffusers_side(model, pos, neg, noise, sigmas, cfg, args.size))
                rss_d = peak_rss_mib()
            for side, rss in (("atelier", rss_a), ("diffusers", rss_d)):
                first = statistics.median(r[0] for r in runs[side])
                per = statistics.median(r[1] for r in runs[side])
                rows.append({"model": kind, "side": side, "size": args.size, "steps": args.steps,
                             "first_step_s": round(first, 4), "s_per_step": round(per, 4),
                             "peak_rss_mib_after": round(rss, 1)})
    print(f"{'model':<12} {'side':<10} {'first step s':>12} {'s/step':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['model']:<12} {r['side']:<10} {r['first_step_s']:>12} {r['s_per_step']:>8} "
              f"{r['peak_rss_mib_after']:>13}")
    for kind in ("flux-dev", "sd35-medium"):
        a, d = (next(r for r in rows if r["model"] == kind and r["side"] == s) for s in ("atelier", "diffusers"))
        print(f"{kind}: atelier / diffusers s/step = {a['s_per_step'] / d['s_per_step']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
