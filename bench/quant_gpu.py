"""Quantized weights on a GPU: full-size random-weight FLUX.1-dev at 1024x1024, one denoiser step per format.

    python bench/quant_gpu.py --out quant-gpu.json          # a lent CUDA machine (bench/gpu.sh runs it)
    python bench/quant_gpu.py --tiny --out /tmp/q.json      # CPU, tiny widths, seconds: checks the script

The FLUX.1-dev transformer (19 double + 38 single blocks, 11.9 B parameters) is built on the meta device
and materialised on the GPU in bf16 (`to_empty`, then in-place uniform init as nn.Linear's default), so no
12 B-parameter CPU init. One step = 4096 image tokens (1024x1024) + 512 text tokens, batch 1, guidance
embedding. Each format is packed from those bf16 weights by torch quantizers on the device (ggml's and
bitsandbytes' block layouts; `tests/test_bench_quant_gpu.py` checks them against gguf, the test fixture's
Q4_K quantizer and bitsandbytes) and run through Atelier's packed weights (`pack_weights`, `store_as_fp8`:
the code real GGUF / fp8 / NF4 files go through), restoring each layer per matmul in bf16.

Per row: s/step (CUDA events, after a warm-up step), peak device memory (torch's max allocated during the
row, minus the bf16 reference weights the row does not use), PSNR of the step output against bf16's, and
for Q4_K also under the `low` memory policy with the budget an 8 GiB card would give (the engine's
Placement, weights parked on the CPU and streamed per block). Rows stop at --budget-s; the JSON is
rewritten after every row, so a timeout keeps what ran.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.checkpoints.bnb4 import Bnb4State  # noqa: E402
from modules.checkpoints.packed import PackedTensor, pack_weights, packed_bytes_in, store_as_fp8  # noqa: E402
from modules.pipeline.memory_policy import GIB, MemoryPolicy  # noqa: E402
from modules.pipeline.offload import Placement  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=4,
            joint_attention_dim=256, pooled_projection_dim=256, axes_dims_rope=(8, 28, 28))
# (latent side in tokens, text tokens): 1024x1024 -> 128x128 latents -> 64x64 patches
TOKENS = {"full": (64, 512), "tiny": (16, 32)}
# most important first: the two goals need bf16, Q8_0 and Q4_K (+ low)
FORMATS = ("bf16", "Q8_0", "Q4_K", "Q4_K-low", "fp8_e4m3fn", "Q5_K", "Q5_0", "NF4")
CUDA_CONTEXT_GIB = 0.5  # outside torch's allocator on a real card (as bench/memory_budget.py)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


# -- quantizers (torch, on the weight's device) ----------------------------------------------------------------
def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml and gguf-py round."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """(n, 32) floats -> (n, 34) Q8_0 blocks: float16 d, 32 int8."""
    d = x.abs().amax(1, keepdim=True) / 127
    qs = _roundf(x * _inverse(d)).to(torch.int8)
    return torch.cat([_as_bytes(d.half()), _as_bytes(qs)], 1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """(n, 32) floats -> (n, 22) Q5_0 blocks: float16 d, 4 bytes of fifth bits, 16 bytes of nibbles."""
    peak = x.gather(1, x.abs().argmax(1, keepdim=True))
    d = peak / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8)
    qh = (((q >> 4) & 1).reshape(-1, 4, 8) << shifts).sum(-1).to(torch.uint8)
    return torch.cat([_as_bytes(d.half()), qh, qs], 1)


def _k_quant(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 256) -> the 16 header bytes (d, dmin, packed 6-bit scales / mins) and q in 0..top per weight,
    by plain per-sub-block min / max (llama.cpp searches for better scales)."""
    x = x.reshape(-1, 8, 32)
    low = x.amin(2).clamp(max=0)
    step = (x.amax(2) - low) / top
    d = step.amax(1, keepdim=True) / 63
    dmin = (-low).amax(1, keepdim=True) / 63
    sc = torch.round(step / torch.where(d > 0, d, 1)).clamp(0, 63).to(torch.uint8)
    m = torch.round(-low / torch.where(dmin > 0, dmin, 1)).clamp(0, 63).to(torch.uint8)
    scale = d.half().float() * sc
    offset = dmin.half().float() * m
    q = torch.round((x + offset[..., None]) / torch.where(scale > 0, scale, 1)[..., None]).clamp(0, top)
    packed = torch.cat([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], 1)
    return torch.cat([_as_bytes(d.half()), _as_bytes(dmin.half()), packed], 1), q.to(torch.uint8)


def _k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) quants -> 128 bytes: sub-blocks 2c / 2c+1 in the low / high nibbles of chunk c."""
    return ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).reshape(q.shape[0], 128)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) floats -> (n, 144) Q4_K blocks (the test fixture's quantizer, in torch)."""
    head, q = _k_quant(x, 15)
    return torch.cat([head, _k_nibbles(q)], 1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) floats -> (n, 176) Q5_K blocks: header, 32 bytes of fifth bits (bit j: sub-block j), nibbles."""
    head, q = _k_quant(x, 31)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8).view(1, 8, 1)
    qh = (((q >> 4) & 1) << shifts).sum(1).to(torch.uint8)
    return torch.cat([head, qh, _k_nibbles(q)], 1)


GGML = {"Q8_0": (32, quantize_q8_0), "Q5_0": (32, quantize_q5_0), "Q5_K": (256, quantize_q5_k),
        "Q4_K": (256, quantize_q4_k)}


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(values, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, nested: int = 256) -> tuple[torch.Tensor, Bnb4State]:
    """bitsandbytes' NF4 layout, double-quantized as Forge's files: 4-bit codes (first element in the high
    nibble) per `blocksize` block with a float32 absmax, the absmaxes stored as uint8 codes per `nested`
    blocks. The nested table here is 256 even steps (bitsandbytes uses its dynamic map): the same restore work."""
    x = weight.float().reshape(-1, blocksize)
    levels = torch.tensor(NF4_LEVELS, device=x.device)
    absmax = x.abs().amax(1)
    codes = _nearest(x / absmax.clamp_min(1e-12)[:, None], levels).reshape(-1)
    data = (codes[0::2] << 4) | codes[1::2]
    offset = absmax.mean()
    centred = torch.nn.functional.pad(absmax - offset, (0, -absmax.numel() % nested)).reshape(-1, nested)
    nested_absmax = centred.abs().amax(1)
    nested_map = torch.linspace(-1, 1, 256, device=x.device)
    scodes = _nearest(centred / nested_absmax.clamp_min(1e-12)[:, None], nested_map).reshape(-1)
    state = Bnb4State(blocksize, levels, scodes[:absmax.numel()], nested_absmax, nested_map, offset, nested)
    return data, state


def pack_tensor(weight: torch.Tensor, fmt: str) -> PackedTensor | None:
    """A Linear weight as a PackedTensor of `fmt`; None when its rows do not fill whole blocks (kept bf16,
    as GGUF converters keep such small tensors)."""
    shape = tuple(weight.shape)
    if fmt == "NF4":
        if weight.numel() % 64:
            return None
        data, state = quantize_nf4(weight)
        return PackedTensor(data, "NF4", shape, bnb=state)
    block, quantize = GGML[fmt]
    if shape[-1] % block:
        return None
    return PackedTensor(quantize(weight.float().reshape(-1, block)).reshape(-1), fmt, shape)


# -- model, inputs, packing ---------------------------------------------------------------------------------
def skeleton(config: dict) -> nn.Module:
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its "keep in float32" note on .to(bfloat16): FLUX has no such modules
    with torch.device("meta"):
        return FluxTransformer2DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)


def random_model(config: dict, device: torch.device, seed: int = 0) -> nn.Module:
    """bf16 FLUX transformer with random weights made on `device`: matrices and biases uniform in
    +-1/sqrt(fan_in) (nn.Linear's default init), RMSNorm weights 1."""
    model = skeleton(config).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            owner = name.rpartition(".")[0]
            weight = params.get(f"{owner}.weight")
            if p.dim() >= 2 or (name.endswith(".bias") and weight is not None and weight.dim() >= 2):
                bound = 1 / math.sqrt(weight.shape[1] if weight is not None else p.shape[1])
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.fill_(1.0)
    return model


def make_inputs(config: dict, side: int, text: int, device: torch.device, seed: int = 1) -> dict:
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return {"hidden_states": randn(1, side * side, config["in_channels"]),
            "encoder_hidden_states": randn(1, text, config["joint_attention_dim"]),
            "pooled_projections": randn(1, config["pooled_projection_dim"]),
            "timestep": torch.tensor([0.5], device=device), "guidance": torch.tensor([3.5], device=device),
            "img_ids": img_ids, "txt_ids": torch.zeros(text, 3, device=device)}


def packed_model(ref: nn.Module, config: dict, fmt: str) -> nn.Module:
    """A model sharing `ref`'s small tensors, every Linear weight packed as `fmt` (ref stays bf16)."""
    if fmt == "bf16":
        return ref
    model = skeleton(config)
    model.load_state_dict(ref.state_dict(), assign=True)
    model.requires_grad_(False)
    if fmt == "fp8_e4m3fn":
        store_as_fp8(model, torch.bfloat16)
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear):
            packed = pack_tensor(module.weight.detach(), fmt)
            if packed is not None:
                pack_weights(module, {"weight": packed}, torch.bfloat16)
    return model


# -- measuring ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def timed_steps(model: nn.Module, inputs: dict, steps: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Seconds per step (CUDA events on a GPU) after one warm-up step, and the last output."""
    out = step(model, inputs)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(model, inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            out = step(model, inputs)
            times.append(time.perf_counter() - began)
    return times, out.float()


def _device_tensors(module: nn.Module, device: torch.device) -> dict[int, int]:
    """storage address -> bytes of `module`'s tensors on `device`."""
    out = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == device.type:
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def unused_reference_bytes(ref: nn.Module | None, model: nn.Module, device: torch.device) -> int:
    """Bytes of the bf16 reference held on the device that the row's model does not use."""
    if ref is None or ref is model:
        return 0
    used = _device_tensors(model, device)
    return sum(n for ptr, n in _device_tensors(ref, device).items() if ptr not in used)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out - ref) ** 2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(span**2 / mse)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / GIB


def measure(model: nn.Module, ref: nn.Module | None, inputs: dict, steps: int, device: torch.device
            ) -> tuple[dict, torch.Tensor]:
    sync(device)
    gc.collect()  # an earlier row's packed model (parametrizations hold reference cycles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, out = timed_steps(model, inputs, steps, device)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - unused_reference_bytes(ref, model, device)) / GIB
    weights = packed_bytes_in(model) + sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                           if "parametrizations" not in n)
    row = {"s_per_step": round(min(times), 4), "s_per_step_all": [round(t, 4) for t in times],
           "weights_gib": round(weights / GIB, 3), "peak_device_gib": None if peak is None else round(peak, 3),
           "host_rss_gib": round(rss_gib(), 2), "finite": bool(torch.isfinite(out).all())}
    return row, out


def measure_low(model: nn.Module, ref: nn.Module | None, inputs: dict, args, device: torch.device
                ) -> tuple[dict, torch.Tensor]:
    """The packed model under the `low` policy with the free memory of a --low-card-gib card."""
    free = int((args.low_card_gib - CUDA_CONTEXT_GIB) * GIB)
    policy = MemoryPolicy("low", keep_free=args.keep_free)
    placement = Placement(policy, device, free_memory=lambda _d: free, always=device.type == "cpu")
    placement.attach(model, nn.Sequential(nn.Linear(1, 1)), [], [], "transformer")
    try:
        row, out = measure(model, ref, inputs, args.steps, device)
        row.update(card_gib=args.low_card_gib, keep_free_gib=args.keep_free,
                   budget_gib=round(placement.budget / GIB, 3),
                   streamed_units=sum(1 for u in placement.components["transformer"].units if not u.on_device),
                   placement_peak_weights_gib=round(placement.peak_bytes / GIB, 3))
    finally:
        placement.detach()
    return row, out


def run_row(fmt: str, state: dict, args, device: torch.device) -> dict:
    """One format's row; `state` holds the bf16 reference model, its output and the packed Q4_K model."""
    began = time.perf_counter()
    if fmt == "Q4_K-low":
        model = state.pop("Q4_K", None) or packed_model(state["ref"], state["config"], "Q4_K")
        row, out = measure_low(model, state["ref"], state["inputs"], args, device)
    else:
        model = packed_model(state["ref"], state["config"], fmt)
        row, out = measure(model, state["ref"], state["inputs"], args.steps, device)
        if fmt == "Q4_K" and "Q4_K-low" in args.formats:
            state["Q4_K"] = model  # the low row reuses it
    if fmt == "bf16":
        state["out"] = out
    del model
    gc.collect()  # free its packed weights now: rows of 6-13 GiB each would not all fit beside the reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["psnr_vs_bf16_db"] = None if fmt == "bf16" else round(psnr(out, state["out"]), 2)
    return {"format": fmt, **row, "row_s": round(time.perf_counter() - began, 1)}


def safe_row(fmt: str, state: dict, args, device: torch.device) -> dict:
    """run_row, or the row's error (out of memory, a kernel missing on this card): the other rows still run."""
    try:
        return run_row(fmt, state, args, device)
    except Exception as err:  # noqa: BLE001 - a one-shot device run keeps going and reports it
        state.pop("Q4_K", None)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"format": fmt, "error": f"{type(err).__name__}: {err}"[:600]}


def summary(rows: list[dict]) -> dict:
    """The issue's two GPU goals, from the rows that ran."""
    by = {r["format"]: r for r in rows if "s_per_step" in r}
    out: dict = {}
    if "bf16" in by and "Q8_0" in by:
        ratio = by["Q8_0"]["s_per_step"] / by["bf16"]["s_per_step"]
        out["q8_0_x_bf16_time"] = round(ratio, 3)
        out["q8_0_goal_1.25x_met"] = ratio <= 1.25
    low = by.get("Q4_K-low", {}).get("peak_device_gib")
    if low is not None:
        out["q4_k_low_peak_gib"] = low
        out["q4_k_low_goal_8gib_met"] = low <= 8
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths (hidden 256, 1+1 blocks, 256 tokens) on the CPU")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per format (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining rows after this many seconds")
    ap.add_argument("--low-card-gib", type=float, default=8.0, help="the card the low-mode row pretends to be")
    ap.add_argument("--keep-free", type=float, default=2.0, help="low mode's free-memory target, GiB")
    ap.add_argument("--out", type=Path, default=Path("quant-gpu.json"))
    args = ap.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown:
        ap.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    if "bf16" not in args.formats:
        args.formats.insert(0, "bf16")  # the reference for PSNR and the time ratio
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; use --tiny (CPU) to check the script")
    if importlib.util.find_spec("diffusers") is None:
        ap.error("diffusers is not importable: install it, or carry .whl/diffusers-*.whl (bench/gpu.sh installs it)")
    began = time.perf_counter()
    config = TINY if args.tiny else FLUX_DEV
    side, text = TOKENS["tiny" if args.tiny else "full"]
    state = {"config": config, "ref": random_model(config, device), "inputs": make_inputs(config, side, text, device)}
    result = {"device": device_name(device), "torch": torch.__version__, "model": "tiny FLUX" if args.tiny else
              "FLUX.1-dev (random weights)", "parameters_b": round(sum(p.numel() for p in state["ref"].parameters())
                                                                   / 1e9, 3),
              "image_tokens": side * side, "text_tokens": text, "steps": args.steps, "compute": "bf16",
              "init_s": round(time.perf_counter() - began, 1), "rows": [], "notes": NOTES}
    print(f"{result['device']}, torch {torch.__version__}: {result['model']}, {result['parameters_b']} B parameters, "
          f"init {result['init_s']} s", flush=True)
    for fmt in args.formats:
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            row = {"format": fmt, "skipped": f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"}
        else:
            row = safe_row(fmt, state, args, device)
        result["rows"].append(row)
        result["summary"] = summary(result["rows"])
        result["wall_s"] = round(time.perf_counter() - began, 1)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(row), f"[{time.perf_counter() - began:.0f} s]", flush=True)
    print_table(result)
    return result


NOTES = ("Every format is packed from the same bf16 random weights by torch quantizers (plain min/max scales "
         "for Q4_K / Q5_K, as the test fixture; NF4's nested absmax table is 256 even steps), so PSNR is "
         "against bf16 for all rows; random weights are not a trained model's, so PSNR is indicative only.",
         "peak_device_gib: torch max_memory_allocated during the row's steps minus the bf16 reference weights "
         "the row does not use; the CUDA context (~0.5 GiB) is not included.",
         "Q4_K-low: the engine's Placement with MemoryPolicy('low', keep_free) and the free memory of a "
         "card_gib card (card - 0.5 GiB context), weights parked on the CPU (not pinned) and streamed per block.")


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, {result['model']}, {result['image_tokens']}+{result['text_tokens']} tokens")
    print("| format | s/step | x bf16 | weights GiB | peak device GiB | PSNR vs bf16 dB |\n|---|---|---|---|---|---|")
    base = next((r["s_per_step"] for r in result["rows"] if r["format"] == "bf16" and "s_per_step" in r), None)
    for r in result["rows"]:
        if "s_per_step" not in r:
            print(f"| {r['format']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        ratio = f"{r['s_per_step'] / base:.2f}" if base else "-"
        print(f"| {r['format']} | {r['s_per_step']:.3f} | {ratio} | {r['weights_gib']:.2f} | {r['peak_device_gib']} "
              f"| {r['psnr_vs_bf16_db']} |")
    print("summary:", json.dumps(result.get("summary", {})))


if __name__ == "__main__":
    main()
