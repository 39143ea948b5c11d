"""Checkpoint switching: RSS after the first load and after each of N switches between two checkpoints.

    .venv/bin/python bench/switch.py [--switches 5] [--precision auto] [--out bench/switch.json]

Uses bench/cpu.py's SD 1.5-width checkpoint and a hard link to it under another name (the model
manager keys models by path, so each switch is a full unload and load). Generates one 64x64
image per load so caches are exercised. Prints the RSS series and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv: list[str] | None = None) -> int:
    from cpu import CACHE, build_checkpoint, status_gb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "switch.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    first = build_checkpoint(CACHE)
    second = CACHE / "sd15-random-seed0-link.safetensors"
    if not second.exists():
        os.link(first, second)
    from modules.app import build_app
    from modules.pipeline.params import Txt2ImgParams
    from modules.settings import Settings

    app = build_app(Settings(device="cpu", precision=args.precision, data_dir=CACHE / "data",
                             disable_extra_extensions=True))
    series = []
    for i in range(args.switches + 1):
        began = time.perf_counter()
        app.engine.load_model(first if i % 2 == 0 else second)
        app.engine.txt2img(Txt2ImgParams(prompt="a", steps=1, sampler_name="Euler", seed=1, width=64, height=64,
                                         save_images=False))
        series.append({"load": i, "rss_gb": status_gb(), "seconds": time.perf_counter() - began})
        print(f"load {i}: RSS {series[-1]['rss_gb']:.2f} GB ({series[-1]['seconds']:.1f} s)", flush=True)
    growth = series[-1]["rss_gb"] / series[0]["rss_gb"]
    print(f"RSS after {args.switches} switches / after the first load: {growth:.3f}")
    args.out.write_text(json.dumps({"precision": args.precision, "series": series, "growth": growth}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
