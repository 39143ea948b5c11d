"""FLUX.1-dev at 1024x1024: which weights sit where under each memory policy, per GPU size and weight format.

    .venv/bin/python bench/memory_budget.py [--keep-free 2] [--json bench/memory-budget.json]

Computed, not measured. The real FLUX.1-dev transformer, T5-XXL encoder, CLIP-L and VAE are built on
the meta device (their exact parameter counts, no weights), each block's bytes follow the weight format,
and the engine's own `Placement` plays two jobs (T5, CLIP-L, two sampling steps, VAE decode) with a
mover that only counts; the row shows the second job, the steady state. The budget is the GPU's memory minus the CUDA context minus --keep-free.
Host RAM: an offloading policy builds every weight on the CPU first, so the peak RSS is the base
process plus all weights; `none` builds on the GPU and the host holds no weights.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.pipeline.memory_policy import GIB, MemoryPolicy  # noqa: E402
from modules.pipeline.offload import Placement, Unit  # noqa: E402

# bytes per weight of a quantized matrix (GGML blocks: Q8_0 = 34 bytes / 32, Q4_K = 144 bytes / 256)
FORMATS = {"bf16": 2.0, "fp8": 1.0, "Q8_0": 34 / 32, "Q4_K": 144 / 256}
QUANTIZED = ("transformer", "t5xxl")  # the format applies to these; CLIP-L and the VAE stay bf16
GPUS = (8, 12, 16, 24)
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context and cuBLAS workspace take before any weight
CUDA_HOST_GIB = 1.0  # host RAM of the CUDA libraries once initialised (added to the measured base)
HOST_GIB = 24
GPU = torch.device("cuda", 0)


def flux_dev_modules() -> dict[str, torch.nn.Module]:
    """The four FLUX.1-dev components at their published sizes, on the meta device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
            "t5xxl": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                             num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
            "clip_l": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, max_position_embeddings=77)),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, use_quant_conv=False,
                                 use_post_quant_conv=False),
        }


def unit_bytes(unit: Unit, fmt: str) -> int:
    """A unit's bytes in `fmt`: matrices of the transformer and T5 in the format, everything else bf16."""
    seen: dict[int, torch.Tensor] = {}
    for module in unit.modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[id(t)] = t
    quantized = unit.component.name in QUANTIZED
    return int(sum(t.numel() * (FORMATS[fmt] if quantized and t.dim() >= 2 else 2.0) for t in seen.values()))


class Tally:
    """A mover that moves nothing; counts bytes that arrive on the GPU."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.arrived = 0

    def __call__(self, module: torch.nn.Module, device: torch.device) -> None:
        if device.type == "cuda":
            self.arrived += self.sizes.get(id(module), 0)


def run_component(placement: Placement, name: str) -> None:
    placement.use(name)
    for unit in placement.components[name].units:
        placement.use_unit(unit)


def simulate(modules: dict, fmt: str, gpu_gib: int, mode: str, keep_free: float) -> dict:
    """Two jobs under the policy; the row describes the second (the steady state)."""
    tally = Tally()
    free = int((gpu_gib - CUDA_CONTEXT_GIB) * GIB)
    placement = Placement(MemoryPolicy("low" if mode == "none" else mode, keep_free=keep_free), GPU, mover=tally,
                          free_memory=lambda _d: free)
    placement.attach(modules["transformer"], modules["vae"], [modules["clip_l"], modules["t5xxl"]],
                     ["clip_l", "t5xxl"], "transformer")
    for unit in placement.units():
        unit.nbytes = unit_bytes(unit, fmt)
        tally.sizes.update({id(m): unit.nbytes // len(unit.modules) for m in unit.modules})
    totals = {name: comp.nbytes for name, comp in placement.components.items()}
    if mode == "none":
        placement.detach()
        return none_row(totals, free, keep_free)
    for _job in range(2):
        job_start = tally.arrived
        for name in ("t5xxl", "clip_l", "transformer"):
            run_component(placement, name)
        before = tally.arrived
        run_component(placement, "transformer")  # another step: what moves every step
        per_step = tally.arrived - before
        sampling = {name: comp.resident_bytes for name, comp in placement.components.items()}
        streamed = sum(1 for u in placement.components["transformer"].units if not u.on_device)
        run_component(placement, "vae")
        per_job = tally.arrived - job_start - 2 * per_step  # loads outside the two steps
    row = {"moved_per_job": per_job, "budget": placement.budget, "totals": totals, "on_gpu_while_sampling": sampling,
           "moved_per_step": per_step, "peak_weights_on_gpu": placement.peak_bytes, "streamed_blocks": streamed}
    placement.detach()
    return row


def none_row(totals: dict[str, int], free: int, keep_free: float) -> dict:
    total = sum(totals.values())
    fits = total + keep_free * GIB <= free
    return {"budget": None, "totals": totals, "on_gpu_while_sampling": totals if fits else None,
            "moved_per_step": 0, "moved_per_job": 0, "peak_weights_on_gpu": total, "streamed_blocks": 0, "fits": fits}


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"


def host_rss(row: dict, mode: str, base: float) -> float:
    return base + (0 if mode == "none" else sum(row["totals"].values()) / GIB)


def describe(row: dict, mode: str) -> str:
    """Where the weights are while the transformer samples."""
    if mode == "none":
        return "all on the GPU" if row["fits"] else "does not fit"
    on, totals = row["on_gpu_while_sampling"], row["totals"]
    parts = []
    for name in ("transformer", "t5xxl", "clip_l", "vae"):
        if on[name] == totals[name]:
            parts.append(f"{name} GPU")
        elif on[name]:
            parts.append(f"{name} {on[name] / GIB:.1f}/{totals[name] / GIB:.1f} GPU")
        else:
            parts.append(f"{name} CPU")
    return ", ".join(parts)


def table(rows: list[dict], base: float) -> str:
    head = ("| GPU | weights | mode | budget GiB | while sampling | streamed blocks | moved/step GiB "
            "| peak weights on GPU GiB | host peak RSS GiB | fits 24 GiB host |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        rss = host_rss(r, r["mode"], base)
        lines.append(f"| {r['gpu']} GiB | {r['format']} | {r['mode']} | {gib(r['budget'])} | {describe(r, r['mode'])} "
                     f"| {r['streamed_blocks']} | {gib(r['moved_per_step'])} | {gib(r['peak_weights_on_gpu'])} "
                     f"| {rss:.1f} | {'yes' if rss <= HOST_GIB else 'no'} |")
    return "\n".join(lines)


def summary(rows: list[dict], base: float) -> str:
    """One line per GPU and format: `none` fits or not; `normal` in detail; `low`'s peak weights."""
    by = {(r["gpu"], r["format"], r["mode"]): r for r in rows}
    lines = ["| GPU | weights | none | normal: while sampling | streamed blocks / moved per step | "
             "moved per job, normal / low | normal / low peak weights on GPU | host peak RSS (offloading) |",
             "|" + "---|" * 8]
    for gpu in GPUS:
        for fmt in FORMATS:
            none, normal, low = (by[(gpu, fmt, m)] for m in ("none", "normal", "low"))
            stream = (f"{normal['streamed_blocks']} / {gib(normal['moved_per_step'])} GiB"
                      if normal["streamed_blocks"] else "0")
            rss = host_rss(normal, "normal", base)
            lines.append(f"| {gpu} GiB | {fmt} | {'fits' if none['fits'] else 'no'} | {describe(normal, 'normal')} "
                         f"| {stream} | {gib(normal['moved_per_job'])} / {gib(low['moved_per_job'])} GiB "
                         f"| {gib(normal['peak_weights_on_gpu'])} / {gib(low['peak_weights_on_gpu'])} GiB "
                         f"| {rss:.1f} GiB{'' if rss <= HOST_GIB else ' (over 24)'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-free", type=float, default=2.0, help="GiB left free for activations")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    modules = flux_dev_modules()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2 + CUDA_HOST_GIB
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    print("parameters:", ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in params.items()))
    rows = []
    for gpu in GPUS:
        for fmt in FORMATS:
            for mode in ("none", "normal", "low"):
                row = simulate(modules, fmt, gpu, mode, args.keep_free)
                rows.append({"gpu": gpu, "format": fmt, "mode": mode, **row})
    print(f"base host RSS (process + CUDA libraries): {base:.1f} GiB; keep free: {args.keep_free} GiB")
    print(table(rows, base))
    print()
    print(summary(rows, base))
    if args.json:
        out = {"parameters": params, "keep_free_gib": args.keep_free, "base_rss_gib": base, "rows": [
            {**r, "budget": None if r["budget"] is None or r["budget"] == float("inf") else int(r["budget"])}
            for r in rows]}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
