"""Hidden-state taps inside a UNet evaluation: self-attention layers and block outputs.

A `HiddenStatesPatch` (what the `unet_hidden_states` hook returns) sees every self-attention
layer's input (after its transformer block's norm) and every block's output (A1111's LDM
`input_blocks.N`, `middle_block`, `output_blocks.N`, those holding a ResNet) and may replace what
the layer or block returns. Its `references(call)` may name extra latent inputs that the UNet
evaluates first, at the same timesteps and conditioning, with `HiddenStatesCall.reference` set to
their position: reference-only attention records the reference's states there and reads them in
the main evaluation. `hidden_states_patched` installs the taps for one UNet call and removes them
afterwards, so nothing outlives the call.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

SELF_ATTENTION, BLOCK = "self_attention", "block"


@dataclass(frozen=True)
class HiddenStatesCall:
    """One tap inside a UNet evaluation, as a `HiddenStatesFn` sees it."""

    kind: str  # "self_attention" or "block"
    name: str  # self-attention: the layer's module path; block: "input_blocks.4", "middle_block", "output_blocks.0"
    index: int  # position among the taps of this kind, in the UNet's forward order (A1111's LDM order)
    hidden_states: torch.Tensor  # self-attention: the layer's input [rows, tokens, C]; block: its output [rows, C, h, w]
    uncond: torch.Tensor  # [rows] bool: the negative prompt's rows
    reference: int | None  # the reference input being evaluated (position in `references`), None: the main one
    attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # self-attention only:
    # attend(hidden_states, context) runs this layer (q from hidden_states, k/v from context, output projection)


HiddenStatesFn = Callable[[HiddenStatesCall], "torch.Tensor | None"]  # -> the tap's replacement output, or None


@dataclass(frozen=True)
class HiddenStatesPatch:
    """What `unet_hidden_states` returns: the tap function and, optionally, the reference inputs per UNet call."""

    function: HiddenStatesFn
    references: Callable[[Any], Sequence[torch.Tensor]] | None = None  # UNetCall -> model inputs shaped as model_in


def block_taps(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(LDM block name, the module whose output ends that block) for each block holding a ResNet, in forward order."""
    taps, n = [], 1
    for block in getattr(unet, "down_blocks", ()):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            taps.append((f"input_blocks.{n}", attentions[j] if attentions else resnet))
            n += 1
        n += 1 if getattr(block, "downsamplers", None) else 0  # a downsampler-only block: no norm, no tap
    if getattr(unet, "mid_block", None) is not None:
        taps.append(("middle_block", unet.mid_block))
    n = 0
    for block in getattr(unet, "up_blocks", ()):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            module = attentions[j] if attentions else resnet
            if j == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                module = block.upsamplers[0]
            taps.append((f"output_blocks.{n}", module))
            n += 1
    return taps


def self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name, module) of the UNet's self-attention layers (`attn1`)."""
    return [(name, m) for name, m in unet.named_modules()
            if hasattr(m, "set_processor") and hasattr(m, "to_q") and not getattr(m, "is_cross_attention", True)]


class _Taps:
    """The state of one patched UNet call: the function, the row flags, the current reference and counters."""

    def __init__(self, fn: HiddenStatesFn, uncond: torch.Tensor) -> None:
        self.fn, self.uncond = fn, uncond
        self.reference: int | None = None
        self.counts = {SELF_ATTENTION: 0, BLOCK: 0}

    def start(self, reference: int | None) -> None:
        self.reference, self.counts = reference, {SELF_ATTENTION: 0, BLOCK: 0}

    def call(self, kind: str, name: str, hidden: torch.Tensor, attend: Any = None) -> torch.Tensor | None:
        index = self.counts[kind]
        self.counts[kind] += 1
        return self.fn(HiddenStatesCall(kind, name, index, hidden, self.uncond, self.reference, attend))


class _SelfAttentionTap:
    """An attention processor that offers the layer's input to the taps and runs the layer's own processor."""

    def __init__(self, taps: _Taps, name: str, base: Any) -> None:
        self.taps, self.name, self.base = taps, name, base

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

        def attend(h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.base(attn, h, context, None, temb)

        out = self.taps.call(SELF_ATTENTION, self.name, hidden_states, attend)
        if out is None:
            out = self.base(attn, hidden_states, None, attention_mask, temb, **kwargs)
        return out


def _block_hook(taps: _Taps, name: str) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        out = taps.call(BLOCK, name, hidden)
        if out is None:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


@contextmanager
def hidden_states_patched(unet: torch.nn.Module, fn: HiddenStatesFn, uncond: torch.Tensor) -> Iterator[_Taps]:
    """The taps active in `unet` for the block's duration; `.start(reference)` before each evaluation."""
    taps = _Taps(fn, uncond)
    layers = self_attention_layers(unet)
    saved = [m.processor for _, m in layers]
    handles = []
    try:
        for (name, m), base in zip(layers, saved, strict=True):
            m.set_processor(_SelfAttentionTap(taps, name, base))
        handles = [module.register_forward_hook(_block_hook(taps, name)) for name, module in block_taps(unet)]
        yield taps
    finally:
        for handle in handles:
            handle.remove()
        for (_, m), base in zip(layers, saved, strict=True):
            m.set_processor(base)
