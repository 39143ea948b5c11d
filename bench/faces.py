"""Face restoration networks at their released sizes (random weights): seconds per 512x512 face.

    .venv/bin/python bench/faces.py [--threads 2] [--runs 2] [--json bench/faces.json]

GFPGAN v1.4's network (GFPGANv1Clean, 512, channel multiplier 2) as Atelier runs it, side by side
with spandrel 0.4.2's GFPGANv1Clean on the same weights (stored noise, fp32, CPU), interleaved;
then CodeFormer's released shape on Atelier's network (no reference: spandrel 0.4.2 lacks it).
Not a test; on a shared machine the seconds are noisy (compare the ratio of one run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gfpgan_pair(runs: int) -> dict[str, float]:
    import torch

    from modules.faces import gfpgan
    from tests.spandrel_reference import spandrel_or_skip

    spandrel_or_skip()
    from spandrel.architectures.GFPGAN import GFPGAN as Reference

    torch.manual_seed(0)
    ref = Reference(out_size=512, num_style_feat=512, channel_multiplier=2, narrow=1, num_mlp=8,
                    sft_half=True).eval()
    mine = gfpgan.build(ref.state_dict()).eval()
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.inference_mode():
        diff = (ref(x, return_rgb=False, randomize_noise=False)[0] - mine(x)).abs().max().item()
        out = {"atelier_s": _time(lambda: mine(x), runs),
               "spandrel_s": _time(lambda: ref(x, return_rgb=False, randomize_noise=False), runs)}
    return {**out, "max_abs_diff": diff, "ratio": out["atelier_s"] / out["spandrel_s"]}


def codeformer(runs: int) -> dict[str, float]:
    import torch

    from modules.faces import codeformer as cf

    net = cf.build(_released_codeformer()).eval()
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.inference_mode():
        return {"atelier_s": _time(lambda: net(x, 0.5), runs)}


def _released_codeformer() -> dict:
    """CodeFormer's released shape: nf 64, channels (1, 2, 2, 4, 4, 8), 9 transformer layers of 512."""
    import torch

    from tests.fixtures import make_tiny_faces as mk

    gen = torch.Generator().manual_seed(0)
    sd: dict = {}
    mult, nf = (1, 2, 2, 4, 4, 8), 64
    enc = [("conv", 3, nf)]
    c = nf
    for i, m in enumerate(mult):
        for _ in range(2):
            enc.append(("res", c, nf * m))
            c = nf * m
            if i == 5:
                enc.append(("attn", c, c))
        if i != 5:
            enc.append(("down", c, c))
    enc += [("res", c, c), ("attn", c, c), ("res", c, c), ("norm", c, c), ("conv", c, 256)]
    dec = [("conv", 256, c), ("res", c, c), ("attn", c, c), ("res", c, c)]
    for i in reversed(range(6)):
        for _ in range(2):
            dec.append(("res", c, nf * mult[i]))
            c = nf * mult[i]
            if i == 5:
                dec.append(("attn", c, c))
        if i != 0:
            dec.append(("up", c, c))
    dec += [("norm", c, c), ("conv", c, 3)]
    for n, (kind, a, b) in enumerate(enc):
        mk._vq_block(sd, f"encoder.blocks.{n}", kind, a, b, gen)
    for n, (kind, a, b) in enumerate(dec):
        mk._vq_block(sd, f"generator.blocks.{n}", kind, a, b, gen)
    small = mk.codeformer_state_dict(nf=32, emb=256, dim=512, layers=9, codes=1024, tokens=256)
    for k, v in small.items():
        if not k.startswith(("encoder.", "generator.", "fuse_convs_dict.")):
            sd[k] = v
    for level, ch in (("32", 256), ("64", 256), ("128", 128), ("256", 128)):
        p = f"fuse_convs_dict.{level}."
        mk._vq_block(sd, p + "encode_enc", "res", 2 * ch, ch, gen)
        for part in ("scale", "shift"):
            mk._conv(sd, f"{p}{part}.0", ch, ch, 3, gen)
            mk._conv(sd, f"{p}{part}.2", ch, ch, 3, gen)
    return sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {"gfpgan_512": gfpgan_pair(args.runs), "codeformer_512": codeformer(args.runs),
               "threads": args.threads, "torch": torch.__version__}
    g = results["gfpgan_512"]
    print("| network (512x512, fp32 CPU) | Atelier s | spandrel s | ratio |")
    print("|---|---|---|---|")
    print(f"| GFPGAN v1.4 shape | {g['atelier_s']:.2f} | {g['spandrel_s']:.2f} | {g['ratio']:.2f} |")
    print(f"| CodeFormer shape | {results['codeformer_512']['atelier_s']:.2f} | - | - |")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
