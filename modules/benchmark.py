"""`webui.py --benchmark`: a short timed generation on the user's own hardware and model.

Loads the default checkpoint (or --ckpt) with the process's settings, runs one untimed warm-up
step (oneDNN / cuDNN pick their kernels on the first call), then a timed txt2img with Euler and
CFG 7, and reports load, text-encoding, per-step and decode times, it/s and peak memory. Under
--compile the warm-up is a 2-step job at the benchmark's size, so the compile stays out of the
timed job, and its time is reported.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class BenchmarkResult:
    device: str
    model: str
    size: int
    steps: int
    load_s: float
    text_s: float
    step_s: float  # median UNet call (CFG: cond and uncond in one batch)
    decode_s: float
    total_s: float
    peak_rss_gb: float
    peak_vram_gb: float | None
    warm_up: str = ""  # what the untimed warm-up ran, e.g. "2 steps at 512x512, compiles"
    warm_up_s: float = 0.0

    @property
    def it_per_s(self) -> float:
        return 1.0 / self.step_s if self.step_s else 0.0

    def table(self) -> str:
        rows = [("device", self.device), ("model", self.model), ("size", f"{self.size}x{self.size}, {self.steps} steps"),
                ("load", f"{self.load_s:.2f} s"), ("text encoding", f"{self.text_s:.3f} s"),
                ("sampling step", f"{self.step_s:.3f} s ({self.it_per_s:.2f} it/s)"),
                ("VAE decode", f"{self.decode_s:.2f} s"), ("total", f"{self.total_s:.2f} s"),
                ("peak RSS", f"{self.peak_rss_gb:.2f} GB"), ("warm-up", f"{self.warm_up_s:.2f} s ({self.warm_up})")]
        if self.peak_vram_gb is not None:
            rows.append(("peak VRAM", f"{self.peak_vram_gb:.2f} GB"))
        return "\n".join(f"{k:>14}: {v}" for k, v in rows)

    def as_dict(self) -> dict:
        return {**asdict(self), "it_per_s": self.it_per_s}


class ForwardTimer:
    """Seconds spent in each named module's forward, call by call."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.calls: dict[str, list[float]] = {name: [] for name in modules}
        self._began: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda *_a, n=name: self._start(n)))
            self._handles.append(module.register_forward_hook(lambda *_a, n=name: self._stop(n)))

    def _start(self, name: str) -> None:
        self._began[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.calls[name].append(time.perf_counter() - self._began.pop(name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def peak_rss_gb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024**3


def run_benchmark(engine, size: int = 512, steps: int = 4, seed: int = 1234) -> BenchmarkResult:
    """Time one generation on `engine`'s default checkpoint (loading it if needed)."""
    from modules.errors import CheckpointError
    from modules.pipeline.params import Txt2ImgParams

    info = engine.default_checkpoint()
    if info is None:
        raise CheckpointError("No checkpoint to benchmark: pass --ckpt FILE or put one in models/Stable-diffusion")
    began = time.perf_counter()
    model = engine.load_model(info.path)
    load_s = time.perf_counter() - began
    params = Txt2ImgParams(prompt="a photograph of a lighthouse at dusk", negative_prompt="blurry", steps=steps,
                           sampler_name="Euler", cfg_scale=7.0, seed=seed, width=size, height=size,
                           save_images=False)
    warm_up, warm_up_s = _warm_up(engine, params)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    timer = ForwardTimer({"text": model.text_encoders[0], "unet": model.unet, "vae": model.vae.decoder})
    try:
        began = time.perf_counter()
        engine.txt2img(params)
        total_s = time.perf_counter() - began
    finally:
        timer.remove()
    vram = torch.cuda.max_memory_allocated(model.device) / 1024**3 if model.device.type == "cuda" else None
    return BenchmarkResult(
        device=engine.devices.describe(), model=info.name, size=size, steps=steps, load_s=load_s,
        text_s=sum(timer.calls["text"]), step_s=statistics.median(timer.calls["unet"] or [0.0]),
        decode_s=sum(timer.calls["vae"]), total_s=total_s, peak_rss_gb=peak_rss_gb(), peak_vram_gb=vram,
        warm_up=warm_up, warm_up_s=warm_up_s)


def _warm_up(engine, params) -> tuple[str, float]:
    """One untimed step at 64x64; compiled modules instead compile for the timed job's shapes (2 steps)."""
    compiles = engine.settings.compile
    size = params.width if compiles else 64
    steps = 2 if compiles else 1
    began = time.perf_counter()
    engine.txt2img(replace(params, steps=steps, width=size, height=size))
    return f"{steps} step(s) at {size}x{size}{', compiles' if compiles else ''}", time.perf_counter() - began


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--benchmark", action="store_true",
                       help="time a short generation on this machine with the default model, print it and exit")
    group.add_argument("--benchmark-size", type=int, default=512, help="image side for --benchmark")
    group.add_argument("--benchmark-steps", type=int, default=4, help="sampling steps for --benchmark")
