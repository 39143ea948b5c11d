"""Checkpoint load time and peak RSS against a raw safetensors read of the same file.

    .venv/bin/python bench/load.py [--repeats 5] [--variants raw,bf16,fp32] [--code DIR] [--out bench/load.json]
    .venv/bin/python bench/load.py --before OLD_CHECKOUT --variants raw,bf16,fp32,bf16-before,fp32-before

Uses bench/cpu.py's SD 1.5-width fp16 checkpoint (2.13 GB). Every measurement runs in its own
process, interleaved per repeat, after one untimed raw read that warms the page cache:
- raw: safetensors' `load_file` plus a clone of every tensor (as in bench/cpu.py);
- bf16 / fp32: Atelier's engine loading the checkpoint to ready modules at that precision, with
  the time spent reading the file (`read_weights`, or `read_state_dict` in older code) reported apart.
`--code DIR` imports Atelier from another checkout, and `--before DIR` adds one more (an older
commit unpacked with `git archive`, say) for the variants named `*-before`, so two versions are
measured side by side. Prints medians and ratios to raw; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

PRECISIONS = {"bf16": "auto", "fp32": "fp32"}  # "auto" is bf16 on a CPU with avx512_bf16


def cpu_s() -> float:
    """User plus system CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def child_raw(ckpt: Path) -> dict:
    """bench/cpu.py's raw read (`load_file` plus a clone of every tensor), with its CPU time."""
    from cpu import child_raw_read

    began = cpu_s()
    out = child_raw_read(ckpt)
    return {**out, "cpu_s": cpu_s() - began}


def child_atelier(ckpt: Path, precision: str, cache: Path) -> dict:
    from cpu import peak_rss_gb, status_gb
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  imported before the clock starts
    from transformers import CLIPTextModel  # noqa: F401

    import modules.checkpoints.load as load_module
    from modules.app import build_app
    from modules.settings import Settings

    app = build_app(Settings(device="cpu", precision=precision, data_dir=cache / "data",
                             outputs_dir=cache / "outputs", disable_extra_extensions=True))
    hook = "read_weights" if hasattr(load_module, "read_weights") else "read_state_dict"  # the loader's entry
    read = getattr(load_module, hook)
    spent = {}

    def timed_read(*args, **kwargs):
        began = time.perf_counter()
        out = read(*args, **kwargs)
        spent.setdefault("read_s", time.perf_counter() - began)
        return out

    setattr(load_module, hook, timed_read)
    rss_before, cpu_began = status_gb(), cpu_s()
    began = time.perf_counter()
    model = app.engine.load_model(ckpt)
    load_s = time.perf_counter() - began
    return {"load_s": load_s, **spent, "cpu_s": cpu_s() - cpu_began, "rss_before_gb": rss_before, "rss_after_gb": status_gb(),
            "peak_rss_gb": peak_rss_gb(), "dtype": str(model.dtype), "code": str(Path(load_module.__file__).parents[2])}


def run_child(args: argparse.Namespace) -> dict:
    from cpu import CKPT  # cpu.py puts this checkout first on sys.path

    sys.path.insert(0, str(args.code))
    ckpt = args.cache / CKPT
    if args.child == "raw":
        return child_raw(ckpt)
    return child_atelier(ckpt, PRECISIONS[args.child.removesuffix("-before")], args.cache)


def spawn(variant: str, args: argparse.Namespace) -> dict:
    code = args.before if variant.endswith("-before") else args.code
    command = [sys.executable, __file__, "--child", variant, "--cache", str(args.cache), "--code", str(code)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=code)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, items in runs.items():
        keys = [k for k, v in items[0].items() if isinstance(v, float | int)]
        out[name] = {k: statistics.median(i[k] for i in items) for k in keys}
    for name, s in out.items():
        if name != "raw" and "raw" in out:
            s["load_over_raw"] = s["load_s"] / out["raw"]["load_s"]
            s["cpu_over_raw"] = s["cpu_s"] / out["raw"]["cpu_s"]
            # per repeat, each load against the raw read of the same round
            pairs = [a["load_s"] / r["load_s"] for a, r in zip(runs[name], runs["raw"], strict=True)]
            s["load_over_raw_paired_median"] = statistics.median(pairs)
    return out


def print_table(s: dict[str, dict], repeats: int) -> None:
    print(f"\nmedian of {repeats} interleaved repeats, page cache warm; CPU s is user + system, all threads")
    from cpu import print_markdown_table

    print_markdown_table(s, {"load s": "load_s", "read s": "read_s", "CPU s": "cpu_s", "load / raw": "load_over_raw",
                             "peak RSS GB": "peak_rss_gb", "RSS after GB": "rss_after_gb"})


def main(argv: list[str] | None = None) -> int:
    from cpu import CACHE, build_checkpoint, cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="raw,bf16,fp32")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout whose modules/ the children import")
    ap.add_argument("--before", type=Path, help="a second checkout, measured as the variants NAME-before")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "load.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.code = args.code.resolve()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    build_checkpoint(args.cache)
    spawn("raw", args)  # warm the page cache, so every variant reads from memory
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for variant in variants:
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} ...", flush=True)
            runs.setdefault(variant, []).append(spawn(variant, args))
    s = summarise(runs)
    print_table(s, args.repeats)
    report = {"repeats": args.repeats, "cpu": cpu_name(), "cores": os.cpu_count(), "code": str(args.code),
              "results": s, "runs": runs}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
