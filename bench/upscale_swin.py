"""SwinIR-M and HAT at their released sizes (random weights), Atelier against spandrel: seconds and peak RSS.

    .venv/bin/python bench/upscale_swin.py [--size 64] [--threads 2] [--models swinir,hat]

SwinIR-M classical x4 (embed 180, 6 groups of 6 blocks, 6 heads, window 8) and HAT x4 (embed 180,
6 x 6, window 16, compress 3, squeeze 30). The weights are made by spandrel's classes (so spandrel
must be installed) and saved once; each variant then loads the file and runs one untiled forward in
its own fresh process (spawn), so its peak RSS is its own. Not a test; noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "swinir": dict(embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8, mlp_ratio=2.0,
                   upscale=4, upsampler="pixelshuffle", img_size=64),
    "hat": dict(embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=16, compress_ratio=3,
                squeeze_factor=30, mlp_ratio=2.0, upscale=4, img_size=64),
}


def _weights(model: str, path: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    from tests.spandrel_reference import spandrel_or_skip

    spandrel_or_skip()
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    net = (SwinIR if model == "swinir" else HAT)(**SIZES[model])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def _run(variant: str, weights: str, size: int, threads: int, queue) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(threads)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    if variant == "spandrel":
        from safetensors.torch import load_file

        from tests.spandrel_reference import spandrel_or_skip

        net = spandrel_or_skip().ModelLoader().load_from_state_dict(load_file(weights)).model.eval()
    else:
        from modules.upscalers.load import load_upscaler

        net = load_upscaler(Path(weights)).net
    with torch.inference_mode():
        start = time.perf_counter()
        out = net(x)
        seconds = time.perf_counter() - start
    queue.put({"seconds": round(seconds, 2), "output": list(out.shape[2:]),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input side (output is 4x)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="swinir,hat")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"{args.size}² -> {args.size * 4}², CPU, {args.threads} threads, untiled")
    print(f"{'model':<8}{'variant':<10}{'seconds':>10}{'peak RSS MiB':>15}")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        weights = REPO / "data" / f"bench-{model}-4x.safetensors"
        weights.parent.mkdir(parents=True, exist_ok=True)
        _weights(model, weights)
        for variant in ("atelier", "spandrel"):
            queue = context.Queue()
            proc = context.Process(target=_run, args=(variant, str(weights), args.size, args.threads, queue))
            proc.start()
            proc.join()
            row = queue.get() if proc.exitcode == 0 and not queue.empty() else {}
            print(f"{model:<8}{variant:<10}{row.get('seconds', '-'):>10}{row.get('peak_rss_mib', '-'):>15}"
                  + ("" if row else f"  exit code {proc.exitcode}"))


if __name__ == "__main__":
    main()
