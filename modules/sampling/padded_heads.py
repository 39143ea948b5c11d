"""Self-attention with each head zero-padded to a multiple of 16 dims, through the projection weights.

torch's fused CPU attention kernel is faster on heads of 48 dims than on SD 1.x's heads of 40
(64x64 latents: 4096 tokens). Zero rows added to each head of `to_q`, `to_k` and `to_v` and zero
columns added to `to_out` give the same result: the padded query and key dims add nothing to the
scores, the padded value dims produce zeros that the output projection ignores, and the scale stays
1/sqrt(true head dim). The padding is applied to the weights at each call, so in-place weight
patches (LoRA) apply at once; under inductor's `freezing` it is folded into the prepacked weights
and costs nothing per call (docs/performance.md, `--compile-freeze`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MULTIPLE = 16


def _padded_rows(weight: torch.Tensor, heads: int, padded: int) -> torch.Tensor:
    """[heads * dim, in] -> [heads * padded, in], each head's extra rows zero."""
    dim = weight.shape[0] // heads
    return F.pad(weight.view(heads, dim, -1), (0, 0, 0, padded - dim)).reshape(heads * padded, -1)


def _padded_bias(bias: torch.Tensor | None, heads: int, padded: int) -> torch.Tensor | None:
    if bias is None:
        return None
    return F.pad(bias.view(heads, -1), (0, padded - bias.shape[0] // heads)).reshape(-1)


def _padded_columns(weight: torch.Tensor, heads: int, padded: int) -> torch.Tensor:
    """[out, heads * dim] -> [out, heads * padded], each head's extra columns zero."""
    dim = weight.shape[1] // heads
    return F.pad(weight.view(weight.shape[0], heads, dim), (0, padded - dim)).reshape(weight.shape[0], -1)


class PaddedHeadsSelfAttention:
    """A diffusers attention processor for plain self-attention layers; anything else goes to `fallback`
    (the layer's previous processor): cross-attention, masks, norms and 4-D inputs."""

    def __init__(self, fallback: Any, multiple: int = MULTIPLE) -> None:
        self.fallback, self.multiple = fallback, multiple

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        unusual = (attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None
                   or attn.norm_k is not None or hidden_states.ndim != 3)
        if encoder_hidden_states is not None or attention_mask is not None or unusual:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows, tokens, _ = hidden_states.shape
        heads = attn.heads
        dim = attn.to_q.weight.shape[0] // heads
        padded = -(-dim // self.multiple) * self.multiple
        q, k, v = (F.linear(hidden_states, _padded_rows(layer.weight, heads, padded),
                            _padded_bias(layer.bias, heads, padded)).view(rows, tokens, heads, padded).transpose(1, 2)
                   for layer in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(rows, tokens, heads * padded)
        projection = attn.to_out[0]
        out = attn.to_out[1](F.linear(out, _padded_columns(projection.weight, heads, padded), projection.bias))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _paddable(layer: Any, multiple: int) -> bool:
    """A self-attention layer, not padded yet, whose heads are not a multiple of `multiple` and whose
    projections are plain linear layers with ordinary weights (not GGUF / fp8 packed ones)."""
    if getattr(layer, "is_cross_attention", True) or isinstance(layer.processor, PaddedHeadsSelfAttention):
        return False
    projections = (layer.to_q, layer.to_k, layer.to_v, *getattr(layer, "to_out", ())[:1])
    if len(projections) < 4 or not all(type(p) is nn.Linear for p in projections):
        return False
    if any(type(p.weight) not in (torch.Tensor, nn.Parameter) for p in projections):
        return False
    return (layer.to_q.weight.shape[0] // layer.heads) % multiple != 0


def pad_self_attention_heads(unet: nn.Module, multiple: int = MULTIPLE) -> int:
    """Install `PaddedHeadsSelfAttention` on the diffusers UNet's paddable self-attention layers; how many.
    Only diffusers' `Attention` layers qualify: FLUX.1's `FluxAttention` and others take other arguments."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    count = 0
    for layer in layers:
        if _paddable(layer, multiple):
            layer.set_processor(PaddedHeadsSelfAttention(layer.processor, multiple))
            count += 1
    return count
