#!/usr/bin/env python3
"""Train the bundled demo model from scratch and write it as one SD 1.x single-file checkpoint.

    .venv/bin/python tools/train_demo_model.py                       # CPU: about 90 minutes
    .venv/bin/python tools/train_demo_model.py --max-minutes 6       # a GPU run (bf16)
    .venv/bin/python tools/train_demo_model.py --resume              # continue from work-dir/state.pt

Progress, loss log (train.log), sample grids (samples/*.png) and the resumable state go to
--work-dir; the checkpoint goes to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_OUT = Path("models/Stable-diffusion/atelier-demo-shapes.safetensors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/demo-training"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-minutes", type=float, default=85.0, help="wall-clock budget, counted across resumes")
    ap.add_argument("--vae-share", type=float, default=0.2, help="share of the budget for the VAE stage")
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--batch", type=int, help="default: 512 on a GPU, 32 on the CPU")
    ap.add_argument("--vae-batch", type=int, help="default: 128 on a GPU, 16 on the CPU")
    ap.add_argument("--pool-size", type=int, help="items encoded once for the UNet stage; "
                    "default: 131072 on a GPU, 4096 on the CPU")
    ap.add_argument("--lr", type=float, help="default: 8e-4 on a GPU (batch 512), 4e-4 on the CPU")
    ap.add_argument("--sample-every", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--resume", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from modules.demo.train import TrainConfig, pick_device, train

    args = parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    cfg = TrainConfig(out=args.out, work_dir=args.work_dir, seed=args.seed, device=args.device,
                      max_minutes=args.max_minutes, vae_share=args.vae_share, vae_steps=args.vae_steps,
                      steps=args.steps, batch=args.batch or (512 if gpu else 32),
                      pool_size=args.pool_size or (131072 if gpu else 4096),
                      vae_batch=args.vae_batch or (128 if gpu else 16), lr=args.lr or (8e-4 if gpu else 4e-4),
                      sample_every=args.sample_every, save_every=args.save_every)
    print(train(cfg, resume=args.resume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
