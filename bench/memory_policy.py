"""The memory policies' own cost on the CPU: s/step of a tiny FLUX.1-dev under each policy, one run.

    .venv/bin/python bench/memory_policy.py [--size 128] [--steps 6] [--repeats 3] [--json bench/memory-policy-cpu.json]

No GPU: the policies run with `always=True`, so every hook, decision and move happens, and each move is a
CPU-to-CPU copy of the unit's weights (`copy`) or a no-op `.to("cpu")` (`hooks`). What this measures is the
bookkeeping and copy overhead per step, not PCIe transfers. Medians over repeats, policies interleaved.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.pipeline.memory_policy import MemoryPolicy  # noqa: E402
from modules.pipeline.offload import Placement, move_module  # noqa: E402
from modules.pipeline.params import Txt2ImgParams  # noqa: E402
from tests.conftest import make_engine  # noqa: E402
from tests.fixtures.make_tiny_mmdit import make_all_in_one  # noqa: E402

POLICIES = {"none": None, "normal (unlimited)": MemoryPolicy("normal", math.inf),
            "low, unlimited (--medvram)": MemoryPolicy("low", math.inf), "low, 0 (--lowvram)": MemoryPolicy("low", 0.0)}


def copying_mover(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()


def step_times(engine, size: int, steps: int) -> list[float]:
    stamps: list[float] = []
    handle = engine.require_model().unet.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        engine.txt2img(Txt2ImgParams(prompt="a fox", steps=steps, width=size, height=size, seed=1, cfg_scale=1.0,
                                     sampler_name="Euler", save_images=False))
    finally:
        handle.remove()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def run(engine, policy: MemoryPolicy | None, mover, size: int, steps: int) -> float:
    model = engine.require_model()
    placement = None
    if policy is not None:
        placement = Placement(policy, torch.device("cpu"), mover=mover, always=True)
        placement.attach(model.unet, model.vae, model.text_encoders, ["clip_l", "t5xxl"], "transformer")
    try:
        return statistics.median(step_times(engine, size, steps))
    finally:
        if placement is not None:
            placement.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(Path(tmp) / "engine")
        engine.load_model(make_all_in_one("flux-dev", Path(tmp) / "flux-dev.safetensors"))
        step_times(engine, args.size, 2)  # warm-up
        results: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, policy in POLICIES.items():
                for label, mover in (("hooks", move_module), ("copy", copying_mover)):
                    if policy is None and label == "copy":
                        continue
                    key = name if policy is None else f"{name}, {label}"
                    results.setdefault(key, []).append(run(engine, policy, mover, args.size, args.steps))
    base = statistics.median(results["none"])
    print(f"tiny FLUX.1-dev, {args.size}x{args.size}, Euler, CPU; median s/step over {args.repeats} runs")
    print("| policy, moves | ms/step | vs none |\n|---|---|---|")
    rows = []
    for key, values in results.items():
        ms = statistics.median(values) * 1000
        rows.append({"policy": key, "ms_per_step": ms, "ratio": ms / (base * 1000)})
        print(f"| {key} | {ms:.2f} | {ms / (base * 1000):.2f}x |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "steps": args.steps, "rows": rows,
                                         "peak_rss_mib": peak}, indent=1))


if __name__ == "__main__":
    main()
