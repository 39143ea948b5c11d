"""CPU attention at SD 1.5's largest self-attention (64x64 latents = 4096 tokens, 8 heads of 40, CFG batch 2).

    .venv/bin/python bench/attention.py [--repeats 3] [--tokens 4096] [--head-dim 40]

Times torch's SDPA in bf16 against the alternatives one might try (fp32 SDPA, heads padded to 48,
a bmm + softmax + bmm loop per head) and prints ms per call, GFLOP/s and the max error against
fp32 SDPA. It explains where the bf16 UNet step loses to the matmul peak (docs/performance.md).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, BATCH = 8, 2
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Head dim padded with zeros to the next multiple of 16 (40 -> 48)."""
    dim = q.shape[-1]
    pad = [F.pad(t, (0, -dim % 16 or 16)) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*pad, scale=dim**-0.5)[..., :dim]


def bmm_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            weights = torch.softmax((q[b, h] * scale) @ k[b, h].T, dim=-1)
            torch.mm(weights, v[b, h], out=out[b, h])
    return out


VARIANTS: dict[str, Attention] = {"sdpa bf16": sdpa_bf16, "sdpa fp32": sdpa_fp32,
                                  "sdpa bf16, head dim padded": sdpa_padded, "bmm per head, bf16": bmm_per_head}


def best_time(fn: Attention, qkv: list[torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*qkv)  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn(*qkv)
        times.append(time.perf_counter() - began)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=40, help="40 at 64x64 latents, 80 at 32x32, 160 at 16x16")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    qkv = [torch.randn(BATCH, HEADS, args.tokens, args.head_dim, generator=generator).bfloat16() for _ in range(3)]
    reference = F.scaled_dot_product_attention(*(t.float() for t in qkv))
    flop = 2 * 2 * BATCH * HEADS * args.tokens**2 * args.head_dim  # QK^T and AV
    print(f"{torch.get_num_threads()} threads, {args.tokens} tokens, {flop / 1e9:.1f} GFLOP per call")
    with torch.inference_mode():
        for name, fn in VARIANTS.items():
            seconds, out = best_time(fn, qkv, args.repeats)
            error = (out.float() - reference).abs().max().item()
            print(f"{name:32s} {seconds * 1000:8.1f} ms  {flop / seconds / 1e9:6.1f} GFLOP/s  max error {error:.4f}")


if __name__ == "__main__":
    main()
