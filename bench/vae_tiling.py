"""Tiled VAE on the CPU: time and peak RSS of a 2048x2048 decode and encode at SD 1.x VAE widths.

    .venv/bin/python bench/vae_tiling.py [--variants ...] [--out bench/vae_tiling.json]

The VAE (83.7M parameters) comes from bench/cpu.py's random SD 1.5-width checkpoint when it is
in bench/cache/ (read with the engine's VAE builder), else it is built with seeded random weights.
It runs in the engine's CPU precision (bf16 with channels_last on a bf16 CPU) through
`latents.decode` / `latents.encode` with the `--vae-tiling` default tiles (64 latents, overlap 16).

Each variant runs in its own child process; the parent watches its RSS and kills it above
--rss-limit-gb (the untiled 2048x2048 decode may not fit). The latent is the tiled encode of a
synthetic image (gradients and shapes), so it is smooth and structured. At 1024x1024 the tiled
decode is compared with the untiled one by PSNR; the seam measure is the mean absolute pixel step
across tile edges over the one across other multiples of 8 pixels (1.0: no seam).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cpu import CACHE, CKPT, cpu_name, status_gb  # noqa: E402  (bench/ is the script's own folder)

WORK = CACHE / "vae_tiling"
CHECKPOINT = CACHE / CKPT
SCALE = 0.18215
# name: (operation, precision, pixel size, tiled)
VARIANTS = {
    "encode-tiled-2048-bf16": ("encode", "auto", 2048, True),
    "decode-tiled-2048-bf16": ("decode", "auto", 2048, True),
    "decode-untiled-1024-bf16": ("decode", "auto", 1024, False),
    "decode-tiled-1024-bf16": ("decode", "auto", 1024, True),
    "decode-tiled-2048-fp32": ("decode", "fp32", 2048, True),
    "decode-untiled-2048-bf16": ("decode", "auto", 2048, False),
    "decode-untiled-1024-fp32": ("decode", "fp32", 1024, False),
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]


# -- child: one operation in a fresh process ------------------------------------------------
def load_vae(precision: str):
    """The checkpoint's VAE (or a seeded random one) in the engine's dtype, layout and attention."""
    import torch
    from diffusers import AutoencoderKL

    from modules.checkpoints.convert import build_vae, vae_source
    from modules.checkpoints.detect import VAE, infer_vae_config
    from modules.devices import apply_attention, apply_memory_format, device_config

    devices = device_config("cpu", precision)
    if CHECKPOINT.exists():
        from safetensors import safe_open

        with safe_open(str(CHECKPOINT), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(VAE)}
        vae = build_vae(vae_source(sd, VAE), {**infer_vae_config(sd), "scaling_factor": SCALE},
                        device=devices.device, dtype=devices.vae_dtype)
        del sd
    else:
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        vae.to(devices.vae_dtype)
    vae.eval()
    apply_attention([vae], devices.attention)
    apply_memory_format([vae], devices.channels_last)
    return vae, devices


def synthetic_image(size: int):
    """[1, 3, size, size] in [-1, 1]: colour gradients, discs, bars and a soft blob."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([x, y, 1 - (x - 0.5).hypot(y - 0.5) * 1.4]) * 1.6 - 0.8
    for cx, cy, r, colour in [(0.3, 0.3, 0.15, (1, -1, -1)), (0.7, 0.6, 0.2, (-1, 1, -0.5)),
                              (0.45, 0.8, 0.1, (0.8, 0.8, -1))]:
        disc = ((x - cx).hypot(y - cy) < r).float()
        img = img * (1 - disc) + torch.tensor(colour).view(3, 1, 1) * disc
    bars = ((x > 0.55) & (x < 0.9) & (y > 0.12) & (y < 0.3) & ((x * 40).floor() % 2 == 0)).float()
    img = img * (1 - bars) - bars
    blob = torch.exp(-((x - 0.15) ** 2 + (y - 0.75) ** 2) / 0.01)
    return (img + blob).clamp(-1, 1)[None]


def latent_for(size: int):
    """The encoded 2048 image's latent: whole, or its centre crop for a smaller size."""
    import torch

    z = torch.load(WORK / "latent-2048.pt", weights_only=True)
    n, full = size // 8, z.shape[-1]
    start = (full - n) // 2
    return z[:, :, start:start + n, start:start + n].contiguous()


def tiling_or_none(tiled: bool):
    from modules.pipeline.vae_tiling import VaeTiling
    from modules.settings import Settings

    tile = Settings().vae_tile_size
    return VaeTiling(tile=tile, overlap=max(tile // 4, 1)) if tiled else None  # as Engine.vae_tiling


def run_operation(op: str, vae, size: int, tiling) -> tuple[object, bool]:
    """Encode the synthetic image or decode the saved latent."""
    from modules.pipeline import latents as latent_ops

    if op == "encode":
        image = synthetic_image(size)
        z = latent_ops.encode(vae, image, SCALE, tiling)
        return z, False
    return latent_ops.decode(vae, latent_for(size), SCALE, tiling)


def child(name: str) -> dict:
    import torch

    torch.set_grad_enabled(False)
    op, precision, size, tiled = VARIANTS[name]
    vae, devices = load_vae(precision)
    weights_gb = sum(p.numel() * p.element_size() for p in vae.parameters()) / 1024**3
    tiling = tiling_or_none(tiled)
    rss_before = status_gb("VmRSS")
    began = time.perf_counter()
    result, fell_back = run_operation(op, vae, size, tiling)
    seconds = time.perf_counter() - began
    peak = status_gb("VmHWM")
    torch.save(result, WORK / (f"latent-{size}.pt" if op == "encode" else f"{name}.pt"))
    return {"variant": name, "op": op, "size": size, "tiled": tiled, "dtype": str(devices.vae_dtype),
            "channels_last": devices.channels_last, "tile": tiling.tile if tiling else None,
            "overlap": tiling.overlap if tiling else None, "seconds": seconds, "weights_gb": weights_gb,
            "rss_before_gb": rss_before, "peak_rss_gb": peak, "peak_minus_weights_gb": peak - weights_gb,
            "op_extra_gb": peak - rss_before, "fp32_fallback": fell_back, "threads": torch.get_num_threads()}


# -- parent: spawn, guard, compare ----------------------------------------------------------
def child_rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def spawn(name: str, limit_gb: float) -> dict:
    """Run one variant in a child; kill it if its RSS passes `limit_gb`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    highest = 0.0
    while proc.poll() is None:
        highest = max(highest, child_rss_gb(proc.pid))
        if highest > limit_gb:
            proc.kill()
            proc.communicate()
            return {"variant": name, "killed": f"RSS passed {limit_gb} GB"}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def psnr(a, b) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2), as tests/test_vae_tiling.py."""
    import torch

    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def tile_edges(size: int, tiling) -> list[int]:
    """Pixel offsets where a tile starts or ends inside the image (one axis)."""
    from modules.pipeline.vae_tiling import VAE_FACTOR, tile_starts

    n = size // VAE_FACTOR
    starts = tile_starts(n, tiling.tile, tiling.overlap)
    edges = {s * VAE_FACTOR for s in starts[1:]} | {(s + tiling.tile) * VAE_FACTOR for s in starts[:-1]}
    return sorted(edges)


def seam_ratio(image, edges: list[int]) -> float:
    """Mean |pixel step| across the tile edges over the mean across the other multiples of 8 (both axes)."""
    img = image.clamp(-1, 1)
    col = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # step between x-1 and x at [x-1]
    row = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    steps = col + row
    others = [x for x in range(8, image.shape[-1], 8) if x not in edges]
    return float(steps[[e - 1 for e in edges]].mean() / steps[[x - 1 for x in others]].mean())


def error_ratio(tiled, plain, edges: list[int], band: int = 8) -> float:
    """Mean |tiled - untiled| within `band` pixels of a tile edge over the mean everywhere."""
    import torch

    err = (tiled.clamp(-1, 1) - plain.clamp(-1, 1)).abs().mean(dim=(0, 1))
    near = torch.zeros(err.shape[-1], dtype=torch.bool)
    for e in edges:
        near[max(e - band, 0):e + band] = True
    mask = near[:, None] | near[None, :]
    return float(err[mask].mean() / err.mean())


def compare(runs: dict[str, dict]) -> dict:
    """PSNR and seam measures from the saved decodes (those that ran)."""
    import torch

    tiling, saved, out = tiling_or_none(True), {}, {}
    for name, run in runs.items():
        path = WORK / f"{name}.pt"
        if run.get("op") == "decode" and path.exists():
            saved[name] = torch.load(path, weights_only=True)
    for name, image in saved.items():
        if VARIANTS[name][3]:
            out[f"seam_ratio {name}"] = seam_ratio(image, tile_edges(image.shape[-1], tiling))
    for size in (1024, 2048):
        tiled, plain = saved.get(f"decode-tiled-{size}-bf16"), saved.get(f"decode-untiled-{size}-bf16")
        if tiled is not None and plain is not None:
            edges = tile_edges(size, tiling)
            out[f"psnr tiled vs untiled {size} bf16"] = psnr(tiled, plain)
            out[f"seam_ratio untiled {size} at the same edges"] = seam_ratio(plain, edges)
            out[f"edge_error_ratio {size}"] = error_ratio(tiled, plain, edges)
    for pair in ("tiled-2048", "untiled-1024"):  # the VAE's own sensitivity, for scale
        bf16, fp32 = saved.get(f"decode-{pair}-bf16"), saved.get(f"decode-{pair}-fp32")
        if bf16 is not None and fp32 is not None:
            out[f"psnr {pair} bf16 vs fp32"] = psnr(bf16, fp32)
    return out


def print_table(runs: dict[str, dict], measures: dict) -> None:
    print("\n| variant | dtype | tile | s | weights GB | peak RSS GB | peak - weights GB | op extra GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        if "killed" in r:
            print(f"| {name} | killed: {r['killed']} |")
            continue
        tile = f"{r['tile']}/{r['overlap']}" if r["tile"] else "untiled"
        print(f"| {name} | {r['dtype'].removeprefix('torch.')} | {tile} | {r['seconds']:.1f} | {r['weights_gb']:.3f} "
              f"| {r['peak_rss_gb']:.2f} | {r['peak_minus_weights_gb']:.2f} | {r['op_extra_gb']:.2f} |")
    for key, value in measures.items():
        print(f"{key}: {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--rss-limit-gb", type=float, default=14.0, help="kill a child whose RSS passes this")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "vae_tiling.json")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    names = args.variants.split(",")
    if "encode-tiled-2048-bf16" not in names and not (WORK / "latent-2048.pt").exists():
        names.insert(0, "encode-tiled-2048-bf16")  # the decodes need its latent
    runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else {}  # earlier variants stay
    for name in names:
        print(f"running {name} ...", flush=True)
        runs[name] = spawn(name, args.rss_limit_gb)
        print(json.dumps(runs[name]), flush=True)
        measures = write_results(args.out, runs)  # after each variant: a later one may be stopped
    print_table(runs, measures)
    return 0


def write_results(out: Path, runs: dict[str, dict]) -> dict:
    measures = compare(runs)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
               "checkpoint": CHECKPOINT.name if CHECKPOINT.exists() else None}
    out.write_text(json.dumps({"machine": machine, "runs": runs, "measures": measures}, indent=2))
    return measures



if __name__ == "__main__":
    sys.exit(main())
