"""CPU benchmark: Atelier against diffusers' StableDiffusionPipeline on SD 1.5-width random weights.

    .venv/bin/python bench/cpu.py [--size 256] [--steps 4] [--repeats 1] [--out bench/cpu.json]

`--before OLD_CHECKOUT` adds the variants `NAME-before` (say `atelier-freeze-before`): NAME run by
that checkout's own bench/cpu.py in the same rounds (a `git worktree` of an older commit, say).

`atelier-compile`, `atelier-freeze` and `atelier-openvino` (--compile with inductor, --compile-freeze,
--compile-backend openvino) run one untimed 2-step job first, which compiles or converts (or reads the
on-disk cache): compile s.

The checkpoint (real SD 1.5 widths, random N(0, 1/fan_in) weights, fp16, original single-file
layout, seeded) is built once under bench/cache/. Every variant runs in its own subprocess
(clean peak RSS), interleaved per repeat: Atelier at its default CPU settings, Atelier fp32,
diffusers at its defaults (fp32) and diffusers in bf16 (its best CPU setting), plus a raw
safetensors read of the file. Both engines sample with Euler (same UNet calls per step), CFG 7.
Timings come from forward hooks on the text encoder, UNet and VAE decoder, the same for both.
Prints a table and the ratios; writes JSON.
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
sys.path.insert(0, str(REPO))
CACHE = REPO / "bench" / "cache"
CKPT = "sd15-random-seed0.safetensors"
VARIANTS = ("atelier", "atelier-fp32", "atelier-compile", "diffusers", "diffusers-bf16", "atelier-openvino",
            "atelier-freeze")
# variant -> (--compile-backend, --compile-freeze)
COMPILED = {"atelier-compile": ("inductor", False), "atelier-freeze": ("inductor", True),
            "atelier-openvino": ("openvino", False)}
PROMPT = "a photograph of an astronaut riding a horse, detailed, sharp focus"
NEGATIVE = "blurry, low quality"
SEED = 1234


def build_checkpoint(cache: Path) -> Path:
    """The SD 1.5-width random checkpoint, built once (about 40 s and 2.1 GB)."""
    from tests.fixtures.make_tiny_checkpoint import SD15_WIDTHS, make_tiny_checkpoint

    path = cache / CKPT
    if not path.exists():
        print(f"building {path} (SD 1.5 widths, random weights) ...", flush=True)
        make_tiny_checkpoint("sd1", path.with_suffix(".tmp.safetensors"), seed=0, widths=SD15_WIDTHS)
        path.with_suffix(".tmp.safetensors").rename(path)
    return path


def build_diffusers_config(cache: Path, ckpt: Path) -> Path:
    """A local config folder (JSON and tokenizer files, no weights) so `from_single_file` stays offline."""
    folder = cache / "sd15-diffusers-config"
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from modules.checkpoints.detect import detect_model_spec
    from modules.checkpoints.read import read_state_dict
    from modules.text.tokenizer import load_tokenizer

    spec = detect_model_spec(read_state_dict(ckpt))
    with torch.device("meta"):
        UNet2DConditionModel(**spec.unet_config).save_config(folder / "unet")
        AutoencoderKL(**spec.vae_config).save_config(folder / "vae")
    CLIPTextConfig(**spec.text_encoders[0].config).save_pretrained(folder / "text_encoder")
    load_tokenizer().save_pretrained(folder / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# -- children: one variant per process ------------------------------------------------
class Timers:
    """Wall time spent in each module's forward (pre/post hooks); the same for both engines."""

    def __init__(self, modules: dict) -> None:
        self.total = dict.fromkeys(modules, 0.0)
        self.calls: dict[str, list[float]] = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda *_a, n=name: self._start(n))
            module.register_forward_hook(lambda *_a, n=name: self._stop(n))
        self._began: dict[str, float] = {}

    def _start(self, name: str) -> None:
        self._began[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        took = time.perf_counter() - self._began.pop(name)
        self.total[name] += took
        self.calls[name].append(took)


def status_gb(field: str = "VmRSS") -> float:
    """A memory line of /proc/self/status in GB (VmRSS: now, VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def child_raw_read(ckpt: Path) -> dict:
    """Every tensor of the file copied into process memory (`load_file` memory-maps lazily, so clone)."""
    from safetensors.torch import load_file

    began = time.perf_counter()
    tensors = {k: v.clone() for k, v in load_file(str(ckpt)).items()}
    took = time.perf_counter() - began
    return {"load_s": took, "params": sum(t.numel() for t in tensors.values()), "peak_rss_gb": peak_rss_gb()}


def child_atelier(ckpt: Path, precision: str, size: int, steps: int, cache: Path, compile: bool = False,
                  backend: str = "inductor", freeze: bool = False) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  imported before the clock starts,
    from transformers import CLIPTextModel  # noqa: F401  as the diffusers child imports its pipeline class

    from modules.app import build_app
    from modules.pipeline.params import Txt2ImgParams
    from modules.settings import Settings

    app = build_app(Settings(device="cpu", precision=precision, data_dir=cache / "data",
                             outputs_dir=cache / "outputs", disable_extra_extensions=True, compile=compile,
                             compile_backend=backend, compile_freeze=freeze))
    began = time.perf_counter()
    model = app.engine.load_model(ckpt)
    load_s = time.perf_counter() - began
    compile_s = _warm_up(app.engine, size) if compile else 0.0
    timers = Timers({"text": model.text_encoders[0], "unet": model.unet, "vae": model.vae.decoder})
    params = Txt2ImgParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler_name="Euler",
                           cfg_scale=7.0, seed=SEED, width=size, height=size, save_images=False)
    began = time.perf_counter()
    result = app.engine.txt2img(params)
    total_s = time.perf_counter() - began
    tag = ("-freeze" if freeze else "-compile" if backend == "inductor" else f"-{backend}") if compile else ""
    result.images[0].save(cache / f"out-{precision}{tag}-{size}.png")
    return {"load_s": load_s, "total_s": total_s, "compile_s": compile_s, "device": app.devices.describe(),
            **_split(timers, steps)}


def _warm_up(engine, size: int) -> float:
    """--compile: one short job of the same shapes compiles the UNet and the decoder (or reads the cache)."""
    from modules.pipeline.params import Txt2ImgParams

    began = time.perf_counter()
    engine.txt2img(Txt2ImgParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, sampler_name="Euler",
                                 cfg_scale=7.0, seed=SEED, width=size, height=size, save_images=False))
    return time.perf_counter() - began


def child_diffusers(ckpt: Path, config: Path, bf16: bool, size: int, steps: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    began = time.perf_counter()
    kwargs = {"torch_dtype": torch.bfloat16} if bf16 else {}
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False, **kwargs)
    load_s = time.perf_counter() - began
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    timers = Timers({"text": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae.decoder})
    began = time.perf_counter()
    pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
         height=size, width=size, generator=torch.Generator().manual_seed(SEED))
    total_s = time.perf_counter() - began
    return {"load_s": load_s, "total_s": total_s, "device": f"cpu, {'bf16' if bf16 else 'fp32'}, diffusers defaults",
            **_split(timers, steps)}


def _split(timers: Timers, steps: int) -> dict:
    """Per-step time is the median UNet call after the first (which also builds oneDNN kernels)."""
    calls = timers.calls["unet"]
    return {"text_s": timers.total["text"], "step_s": statistics.median(calls[1:] or calls),
            "first_step_s": calls[0], "unet_calls": len(calls), "decode_s": timers.total["vae"],
            "peak_rss_gb": peak_rss_gb()}


def run_child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_grad_enabled(False)
    ckpt = args.cache / CKPT
    if args.child == "raw":
        return child_raw_read(ckpt)
    if args.child.startswith("atelier"):
        precision = "fp32" if args.child == "atelier-fp32" else "auto"
        return child_atelier(ckpt, precision, args.size, args.steps, args.cache, args.child in COMPILED,
                             *COMPILED.get(args.child, ("inductor", False)))
    return child_diffusers(ckpt, args.cache / "sd15-diffusers-config", args.child == "diffusers-bf16",
                           args.size, args.steps)


# -- parent: interleave, summarise ----------------------------------------------------------
def spawn(variant: str, args: argparse.Namespace) -> dict:
    """`variant` in a fresh process; `NAME-before` runs NAME with the `--before` checkout's own bench/cpu.py."""
    code, cache = (args.before, before_cache(args.cache)) if variant.endswith("-before") else (REPO, args.cache)
    command = [sys.executable, str(code / "bench" / "cpu.py"), "--child", variant.removesuffix("-before"),
               "--size", str(args.size), "--steps", str(args.steps), "--cache", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=code)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def before_cache(cache: Path) -> Path:
    """The `--before` checkout's cache: the same checkpoint, config and data folder, its own output images."""
    folder = cache / "before"
    folder.mkdir(exist_ok=True)
    for name in (CKPT, "sd15-diffusers-config", "data"):
        if not (folder / name).exists():
            (folder / name).symlink_to((cache / name).resolve())
    return folder


def psnr(a: Path, b: Path) -> float | None:
    import numpy as np
    from PIL import Image

    if not (a.exists() and b.exists()):
        return None
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# (JSON key, label, image tag, reference tag): the images child_atelier saved, out-auto{tag}-{size}.png
PSNR_PAIRS = (("psnr_default_vs_fp32_db", "atelier default vs atelier fp32", "", "fp32"),
              ("psnr_compile_vs_fp32_db", "atelier --compile vs atelier fp32", "-compile", "fp32"),
              ("psnr_freeze_vs_fp32_db", "atelier --compile-freeze vs atelier fp32", "-freeze", "fp32"),
              ("psnr_openvino_vs_fp32_db", "atelier --compile-backend openvino vs atelier fp32", "-openvino", "fp32"),
              ("psnr_openvino_vs_default_db", "atelier --compile-backend openvino vs atelier default", "-openvino",
               "auto"))


def psnr_report(cache: Path, size: int) -> dict[str, float | None]:
    """Each pair's PSNR on the same seed (None where either image is missing), printed as it goes."""
    out = {}
    for key, label, tag, reference in PSNR_PAIRS:
        out[key] = psnr(cache / f"out-auto{tag}-{size}.png", cache / f"out-{reference}-{size}.png")
        if out[key] is not None:
            print(f"  PSNR {label} (same seed): {out[key]:.1f} dB")
    return out


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, items in runs.items():
        keys = [k for k, v in items[0].items() if isinstance(v, float | int)]
        out[name] = {k: statistics.median(i[k] for i in items) for k in keys}
        out[name]["device"] = items[0].get("device", "")
    return out


def ratios(s: dict[str, dict], variants: list[str]) -> dict[str, float]:
    """How many times faster (or leaner) Atelier (default, and compiled) is than each other variant."""
    out = {}
    for base in (b for b in ("atelier", "atelier-compile", "atelier-freeze", "atelier-openvino") if b in s):
        for other in (v for v in variants if v != base and (v not in COMPILED or base == "atelier-openvino")):
            for key in ("total_s", "step_s", "decode_s", "text_s", "load_s"):
                if key in s[other] and s[base].get(key):
                    out[f"{other}/{base} {key}"] = s[other][key] / s[base][key]
    if "raw" in s:
        for v in variants:
            out[f"{v} load / raw read"] = s[v]["load_s"] / s["raw"]["load_s"]
    return out


def print_markdown_table(rows: dict[str, dict], columns: dict[str, str]) -> None:
    """One row per variant; `columns` maps each header to its measure's key ('-' where missing)."""
    print("| variant | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for name, r in rows.items():
        cells = [name] + [f"{r[k]:.2f}" if k in r else "-" for k in columns.values()]
        print("| " + " | ".join(cells) + " |")


def print_table(s: dict[str, dict], rats: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\n{args.size}x{args.size}, {args.steps} Euler steps, CFG 7 (batch 2 per UNet call), "
          f"median of {args.repeats}")
    print_markdown_table(s, {"load s": "load_s", "text s": "text_s", "s/step": "step_s", "decode s": "decode_s",
                             "total s": "total_s", "compile s": "compile_s",
                             "peak RSS GB": "peak_rss_gb"})
    for k, v in rats.items():
        print(f"  {k}: {v:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "cpu.json")
    ap.add_argument("--before", type=Path, help="an older checkout, measured as the variants NAME-before")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if any(v.endswith("-before") for v in variants) and args.before is None:
        ap.error("the variants NAME-before need --before OLD_CHECKOUT")
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(args.cache)
    build_diffusers_config(args.cache, ckpt)
    spawn("raw", args)  # warm the page cache once, so every variant reads from memory
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for variant in ["raw", *variants]:
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} ...", flush=True)
            runs.setdefault(variant, []).append(spawn(variant, args))
    s = summarise(runs)
    rats = ratios(s, variants)
    print_table(s, rats, args)
    report = {"size": args.size, "steps": args.steps, "repeats": args.repeats, "cpu": cpu_name(),
              "cores": os.cpu_count(), "results": s, "runs": runs, "ratios": rats,
              **psnr_report(args.cache, args.size)}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
