"""GPU benchmark for a lent machine: Atelier (SDPA, xformers, --compile) against diffusers' pipeline.

    python bench/gpu.py --out gpu.json            # on a CUDA machine (bench/gpu.sh sets it up)
    python bench/gpu.py --dry-run                 # CPU, tiny widths: checks the script runs

Random weights at real widths, built directly on the GPU (no checkpoint files to write):
SD 1.5 at 512x512 (batch 1 and 4) and SDXL at 1024x1024 (batch 1). Atelier and diffusers run
the same modules. it/s = (steps - 1) / (time of a `steps`-step job - time of a 1-step job), so
text encoding, decode and setup cancel out; peak VRAM is torch's max allocated per variant.
Variants: atelier fp16 SDPA, atelier xformers (when importable), atelier + torch.compile,
diffusers at its defaults (fp32) and diffusers fp16. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SD15 = {"arch": "sd1", "size": 512, "unet": dict(cross_attention_dim=768, attention_head_dim=8),
        "encoders": [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768)]}
SDXL = {"arch": "sdxl", "size": 1024,
        "unet": dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                     attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
        "encoders": [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768),
                     dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          projection_dim=1280, hidden_act="gelu")]}
TINY = {"unet": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32),
        "vae": dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=32),
        "encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=32)}


def build_model(arch: dict, device: torch.device, dtype: torch.dtype, tiny: bool):
    """A LoadedModel of random weights at `arch`'s widths (tiny widths in a dry run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modules.checkpoints.model import CheckpointInfo, LoadedModel, ModelSpec, TextEncoderSpec

    sdxl = arch["arch"] == "sdxl"
    unet_cfg = dict(arch["unet"])
    encoders_cfg = [dict(e) for e in arch["encoders"]]
    vae_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   latent_channels=4, scaling_factor=0.13025 if sdxl else 0.18215)
    if tiny:
        unet_cfg.update(TINY["unet"] if not sdxl else dict(block_out_channels=(32, 64, 64), attention_head_dim=2,
                                                           transformer_layers_per_block=1,
                                                           addition_time_embed_dim=8,
                                                           projection_class_embeddings_input_dim=32 + 6 * 8))
        if sdxl:
            unet_cfg["cross_attention_dim"] = 64
        else:
            unet_cfg.update(cross_attention_dim=32, attention_head_dim=2)
        vae_cfg.update(TINY["vae"], layers_per_block=1)
        encoders_cfg = [dict(TINY["encoder"]) for _ in encoders_cfg]
    specs = []
    encoders = []
    for i, cfg in enumerate(encoders_cfg):
        pooled = sdxl and i == 1
        flavour, layer = ("open_clip", "penultimate") if pooled else ("clip_l", "penultimate" if sdxl else "last")
        specs.append(TextEncoderSpec(flavour, layer, cfg, pad_with_zero=pooled, pooled=pooled))
        cls = CLIPTextModelWithProjection if pooled else CLIPTextModel
        with torch.device(device):
            encoders.append(cls(CLIPTextConfig(**cfg)).to(dtype).eval().requires_grad_(False))
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg).to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**vae_cfg).to(dtype).eval().requires_grad_(False)
    spec = ModelSpec(arch["arch"], "eps", dict(unet.config), dict(vae.config), tuple(specs),
                     vae_scale_factor=vae_cfg["scaling_factor"])
    info = CheckpointInfo(Path(f"random-{arch['arch']}.safetensors"), f"random-{arch['arch']}", "safetensors")
    return LoadedModel(info, spec, "", unet, vae, encoders, device=torch.device(device), dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def measure(job, device: torch.device, steps: int) -> dict:
    """it/s from a 1-step and a `steps`-step job (after a warm-up), and peak VRAM of the longer one."""
    job(1)  # warm-up: kernels, autotuning, torch.compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one = timed(lambda: job(1), device)
    full = timed(lambda: job(steps), device)
    vram = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    it_per_s = (steps - 1) / (full - one) if full > one else float("nan")  # nan: too noisy to tell
    return {"it_per_s": it_per_s, "job_s": full, "one_step_job_s": one, "peak_vram_gb": vram}


def atelier_job(engine, size: int, batch: int):
    from modules.pipeline.params import Txt2ImgParams

    def job(steps: int) -> None:
        engine.txt2img(Txt2ImgParams(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=steps,
                                     sampler_name="Euler", cfg_scale=7.0, seed=1, width=size, height=size,
                                     batch_size=batch, save_images=False))
    return job


def diffusers_job(model, size: int, batch: int):
    import diffusers

    from modules.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if model.spec.is_sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                                   text_encoder_2=model.text_encoders[1], tokenizer=tok,
                                                   tokenizer_2=tok, unet=model.unet, scheduler=scheduler)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=tok,
                                                 unet=model.unet, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def job(steps: int) -> None:
        pipe(prompt=["a lighthouse at dusk"] * batch, negative_prompt=["blurry"] * batch, num_inference_steps=steps,
             guidance_scale=7.0, height=size, width=size, generator=torch.Generator(model.device).manual_seed(1))
    return job


def engine_for(model, xformers: bool):
    from modules.app import build_app
    from modules.devices import apply_attention
    from modules.settings import Settings

    app = build_app(Settings(device=str(model.device), precision="fp16" if model.device.type == "cuda" else "fp32",
                             xformers=xformers, disable_all_extensions=True, data_dir=Path("/tmp/atelier-gpu-data"),
                             max_size=4096))
    app.engine.models.adopt(model)
    apply_attention([model.unet, model.vae], app.devices.attention)
    return app.engine


def run_config(name: str, arch: dict, batch: int, args, device: torch.device, fp16: torch.dtype) -> dict:
    size = 64 if args.dry_run else arch["size"]
    out: dict[str, dict] = {}
    model = build_model(arch, device, fp16, args.dry_run)
    out["atelier-sdpa"] = measure(atelier_job(engine_for(model, False), size, batch), device, args.steps)
    if not args.dry_run and device.type == "cuda":
        try:
            import xformers  # noqa: F401

            out["atelier-xformers"] = measure(atelier_job(engine_for(model, True), size, batch), device, args.steps)
            from diffusers.models.attention_processor import AttnProcessor2_0

            for module in (model.unet, model.vae):  # back to SDPA for the other variants
                module.set_attn_processor(AttnProcessor2_0())
        except ImportError:
            out["atelier-xformers"] = {"skipped": "xformers not installed"}
    out["diffusers-fp16"] = measure(diffusers_job(model, size, batch), device, args.steps)
    if "compile" in args.variants:
        eager = model.unet
        model.unet = torch.compile(eager)
        out["atelier-compile"] = measure(atelier_job(engine_for(model, False), size, batch), device, args.steps)
        model.unet = eager
    if "fp32" in args.variants:  # last: converts the modules in place
        for module in (model.unet, model.vae, *model.text_encoders):
            module.float()
        out["diffusers-default-fp32"] = measure(diffusers_job(model, size, batch), device, args.steps)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": name, "size": size, "batch": batch, "variants": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, 64x64: only checks the script")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", default="sd15-b1,sd15-b4,sdxl-b1")
    ap.add_argument("--variants", default="compile,fp32", help="extra variants: compile, fp32")
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    fp16 = torch.float32 if args.dry_run else torch.float16
    if args.dry_run:
        args.steps = min(args.steps, 3)
    table = {"sd15-b1": (SD15, 1), "sd15-b4": (SD15, 4), "sdxl-b1": (SDXL, 1)}
    results = []
    for name in args.configs.split(","):
        arch, batch = table[name]
        print(f"{name} ...", flush=True)
        results.append(run_config(name, arch, batch, args, device, fp16))
        args.out.write_text(json.dumps({"device": gpu_name(device), "steps": args.steps, "results": results}, indent=2))
    print_table(results, device)
    return 0


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def print_table(results: list[dict], device: torch.device) -> None:
    print(f"\n{gpu_name(device)}, torch {torch.__version__}")
    print("| config | variant | it/s | peak VRAM GB | vs diffusers fp32 | vs diffusers fp16 |\n|---|---|---|---|---|---|")
    for r in results:
        v = r["variants"]
        base32 = v.get("diffusers-default-fp32", {}).get("it_per_s")
        base16 = v.get("diffusers-fp16", {}).get("it_per_s")
        for name, m in v.items():
            if "it_per_s" not in m:
                print(f"| {r['config']} | {name} | {m} | | | |")
                continue
            vram = f"{m['peak_vram_gb']:.2f}" if m["peak_vram_gb"] is not None else "-"
            r32 = f"{m['it_per_s'] / base32:.2f}x" if base32 else "-"
            r16 = f"{m['it_per_s'] / base16:.2f}x" if base16 else "-"
            print(f"| {r['config']} | {name} | {m['it_per_s']:.2f} | {vram} | {r32} | {r16} |")


if __name__ == "__main__":
    sys.exit(main())
