"""ESRGAN 4x (RRDBNet: 64 features, 23 blocks, the size of 4x-UltraSharp / R-ESRGAN 4x+): seconds and peak RSS.

    .venv/bin/python bench/upscale.py [--size 512] [--tile 192] [--threads 2] [--json bench/upscale.json]

Each variant runs in its own fresh process (spawn), so its peak RSS is its own: Atelier untiled,
Atelier tiled (`--tile`, overlap 16), spandrel's own call on the same weights when spandrel
imports, and (variant "tiling 2048") the tiling path alone on 2048² -> 8192² with a trivial network. Random weights (timing and memory do not depend on the values). Prints a table and JSON.
Not a test: on a shared two-core machine use --size 128 or 256 (512 takes minutes a variant).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from modules.upscalers.esrgan import RRDBConfig, RRDBNet

    torch.manual_seed(0)
    net = RRDBNet(RRDBConfig(in_ch=3, out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, num_upsample=2,
                             unshuffle=1))
    save_file({k: v.contiguous() * 0.1 for k, v in net.state_dict().items()}, str(path))


def to_tensor_shape(image):
    import torch

    return torch.empty(1, 3, image.height, image.width, device="meta")


def _run(variant: str, weights: str, size: int, tile: int, threads: int, queue) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(threads)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    if variant == "tiling 2048":  # the tiling path alone at 2048² -> 8192², a nearest-neighbour stand-in net
        import torch.nn.functional as F

        from modules.upscalers.runner import to_image
        from modules.upscalers.tiling import upscale_tiled

        x = torch.rand(1, 3, 2048, 2048)
        run = lambda: to_tensor_shape(to_image(upscale_tiled(  # noqa: E731
            lambda t: F.interpolate(t, scale_factor=4, mode="nearest"), x, 4, 512, 32)))
    elif variant == "spandrel":
        from safetensors.torch import load_file

        from tests.spandrel_reference import spandrel_or_skip

        net = spandrel_or_skip().ModelLoader().load_from_state_dict(load_file(weights)).model.eval()
        run = lambda: net(x)  # noqa: E731
    else:
        from modules.upscalers.load import load_upscaler
        from modules.upscalers.tiling import upscale_tiled

        loaded = load_upscaler(Path(weights))
        chosen = tile if variant == "atelier tiled" else 0
        run = lambda: upscale_tiled(loaded.net, x, loaded.scale, chosen, 16)  # noqa: E731
    with torch.inference_mode():
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
    queue.put({"variant": variant, "seconds": round(seconds, 2), "output": list(out.shape[2:]),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="input side (output is 4x)")
    parser.add_argument("--tile", type=int, default=192, help="tile side for the tiled variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="atelier untiled,atelier tiled,spandrel,tiling 2048",
                        help="comma-separated, run in this order")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "upscale.json")
    args = parser.parse_args()
    weights = REPO / "data" / "bench-esrgan-4x.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    _weights(weights)
    context = mp.get_context("spawn")
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        queue = context.Queue()
        proc = context.Process(target=_run, args=(variant, str(weights), args.size, args.tile, args.threads, queue))
        proc.start()
        proc.join()
        if proc.exitcode == 0 and not queue.empty():
            rows.append(queue.get())
        else:
            rows.append({"variant": variant, "error": f"exit code {proc.exitcode} (spandrel not installed?)"})
    print(f"ESRGAN 4x, {args.size}² -> {args.size * 4}², CPU, {args.threads} threads, tile {args.tile}")
    print(f"{'variant':<18}{'seconds':>10}{'peak RSS MiB':>15}")
    for row in rows:
        print(f"{row['variant']:<18}{row.get('seconds', '-'):>10}{row.get('peak_rss_mib', '-'):>15}"
              + (f"  {row['error']}" if "error" in row else ""))
    args.json.write_text(json.dumps({"size": args.size, "tile": args.tile, "threads": args.threads,
                                     "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
