"""Cross-attention patches: extra attention outputs added inside a UNet's cross-attention layers.

A `CrossAttentionFn` sees each cross-attention layer's query (after `to_q`, split into heads) and
returns a tensor to add to the layer's attention output before its output projection, or None.
That is the seam of decoupled cross-attention (IP-Adapter: softmax(q k_ip^T) v_ip over image tokens).
`cross_attention_patched` installs the layer processors for one UNet call and restores the
model's own processors afterwards, so nothing outlives the call.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CrossAttentionCall:
    """One cross-attention layer inside a UNet evaluation, as a `CrossAttentionFn` sees it."""

    name: str  # the layer's module path ("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    index: int  # its position among all the UNet's attention layers (self and cross), in module order
    query: torch.Tensor  # [rows, heads, tokens, head_dim]
    heads: int
    uncond: torch.Tensor  # [rows] bool: the negative prompt's rows


CrossAttentionFn = Callable[[CrossAttentionCall], "torch.Tensor | None"]  # -> [rows, tokens, heads * head_dim]


def attention_layers(unet: torch.nn.Module) -> list[tuple[int, str, Any]]:
    """(index among all attention layers, name, module) of the UNet's cross-attention layers."""
    layers = [(name, m) for name, m in unet.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_q")]
    return [(i, name, m) for i, (name, m) in enumerate(layers) if getattr(m, "is_cross_attention", False)]


class _PatchedCrossAttention:
    """Scaled dot-product cross-attention plus the patch's extra output, then the layer's output projection."""

    def __init__(self, index: int, name: str, base: Any, fn: CrossAttentionFn, uncond: torch.Tensor) -> None:
        self.index, self.name, self.base, self.fn, self.uncond = index, name, base, fn, uncond

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        unusual = attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3
        if encoder_hidden_states is None or unusual:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q, k, v = (t.view(rows, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, heads * head_dim).to(q.dtype)
        extra = self.fn(CrossAttentionCall(self.name, self.index, q, heads, self.uncond))
        if extra is not None:
            out = out + extra
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def cross_attention_patched(layers: list[tuple[int, str, Any]], fn: CrossAttentionFn,
                            uncond: torch.Tensor) -> Iterator[None]:
    """`fn` active in the given cross-attention layers (from `attention_layers`) for the block's duration."""
    saved = [m.processor for _, _, m in layers]
    try:
        for (index, name, m), base in zip(layers, saved, strict=True):
            m.set_processor(_PatchedCrossAttention(index, name, base, fn, uncond))
        yield
    finally:
        for (_, _, m), base in zip(layers, saved, strict=True):
            m.set_processor(base)
