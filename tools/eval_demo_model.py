#!/usr/bin/env python3
"""Measure the demo model's prompt adherence through the engine; print a table and write JSON.

    .venv/bin/python tools/eval_demo_model.py [--ckpt FILE] [--prompts 24] [--per-prompt 2] [--json out.json]

Held-out prompts (attribute combinations never used in training) are generated with the default
sampler, 20 steps, at CFG 7 and CFG 1; each image's background colour, shape colour, shape type
and position are read back by pixel analysis. It also measures a negative prompt's effect,
img2img at strength 0.3 and inpainting a masked square with "a green square".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modules.demo import DEMO_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=DEMO_CHECKPOINT)
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts")
    ap.add_argument("--per-prompt", type=int, default=2, help="images (seeds) per prompt")
    ap.add_argument("--checks", type=int, default=8, help="prompts / images for the negative, img2img, inpaint checks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=Path("outputs/demo-eval.json"))
    return ap.parse_args(argv)


def table(report: dict) -> str:
    from modules.demo.evaluate import ATTRIBUTES, TARGETS

    rows = [f"{'attribute':<12}{'CFG 7':>8}{'CFG 1':>8}{'target':>8}  met", "-" * 44]
    for a in (*ATTRIBUTES, "all"):
        hi, lo = report["cfg7"][a], report["cfg1"][a]
        target = TARGETS.get(a)
        met = "" if target is None else ("yes" if hi >= target else f"no ({hi - target:+.0%})")
        rows.append(f"{a:<12}{hi:>8.0%}{lo:>8.0%}{(f'{target:.0%}' if target else ''):>8}  {met}")
    neg, i2i, inp = report["negative_prompt"], report["img2img_0.3"], report["inpaint_green_square"]
    rows += ["", f"negative 'red': images showing red {neg['without_negative']:.0%} -> {neg['with_negative']:.0%}",
             f"img2img 0.3: shape kept {i2i['shape']:.0%}, position kept {i2i['position']:.0%}",
             f"inpaint 'a green square': green inside {inp['green_share_inside']:.0%}, "
             f"mean change outside {inp['mean_change_outside']:.1f}/255"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from modules.app import build_app
    from modules.demo.evaluate import (
        EvalOptions,
        adherence,
        held_out_prompts,
        img2img_keeps,
        inpaint_green,
        negative_prompt_effect,
    )
    from modules.settings import Settings

    args = parse_args(argv)
    app = build_app(Settings(ckpt=args.ckpt, device=args.device))
    app.engine.load_model(args.ckpt)
    opts = EvalOptions(steps=args.steps, seed=args.seed)
    prompts = held_out_prompts(args.prompts)
    started = time.monotonic()
    report = {"checkpoint": str(args.ckpt), "prompts": args.prompts, "per_prompt": args.per_prompt,
              "steps": args.steps, "sampler": opts.sampler, "device": str(app.devices.device),
              "cfg7": adherence(app.engine, prompts, args.per_prompt, 7.0, opts),
              "cfg1": adherence(app.engine, prompts, args.per_prompt, 1.0, opts),
              "negative_prompt": negative_prompt_effect(app.engine, args.checks, args.per_prompt, opts),
              "img2img_0.3": img2img_keeps(app.engine, args.checks, opts),
              "inpaint_green_square": inpaint_green(app.engine, args.checks, opts)}
    report["seconds"] = round(time.monotonic() - started, 1)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
