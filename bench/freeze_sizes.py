"""--compile-freeze across image sizes: per-step time and RSS as a session moves from 512² to 448² and 384².

    .venv/bin/python bench/freeze_sizes.py [--dynamic] >> bench/freeze-sizes.jsonl

Each size runs a short job first (which compiles, or not) and then a longer one. dynamo compiles the first
size with static shapes; the second size compiles a dynamic graph that serves every later size. Each
frozen graph holds its own prepacked copy of the weights, which the RSS column shows. `--dynamic`
compiles with dynamic shapes from the first call instead (one graph). Uses bench/cpu.py's checkpoint.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu import CACHE, CKPT, NEGATIVE, PROMPT, SEED, Timers, build_checkpoint  # noqa: E402

SIZES = ((512, 4), (512, 5), (448, 2), (448, 5), (384, 2), (384, 5))  # (size, steps) in session order


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e9


def job(app, model, size: int, steps: int) -> dict:
    from modules.pipeline.params import Txt2ImgParams

    timers = Timers({"unet": model.unet})
    began = time.perf_counter()
    app.engine.txt2img(Txt2ImgParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler_name="Euler",
                                     cfg_scale=7.0, seed=SEED, width=size, height=size, save_images=False))
    calls = timers.calls["unet"][1:]
    return {"size": size, "steps": steps, "job_s": round(time.perf_counter() - began, 1),
            "step_s": round(statistics.median(calls), 3), "rss_gb": round(rss_gb(), 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes from the first call")
    args = ap.parse_args()
    import torch
    from torch._dynamo.utils import counters

    from modules.app import build_app
    from modules.settings import Settings

    torch.set_grad_enabled(False)
    build_checkpoint(CACHE)
    app = build_app(Settings(device="cpu", precision="auto", data_dir=CACHE / "data", outputs_dir=CACHE / "outputs",
                             disable_extra_extensions=True, compile=True, compile_freeze=True))
    model = app.engine.load_model(CACHE / CKPT)
    if args.dynamic:
        for module in (model.unet, model.vae.decoder):
            call = module._compiled_call_impl
            call.compiled = torch.compile(call.eager, dynamic=True)
    jobs = [job(app, model, size, steps) for size, steps in SIZES]
    print(json.dumps({"dynamic": args.dynamic, "jobs": jobs, "graphs": counters["stats"]["unique_graphs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
