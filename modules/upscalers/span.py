"""SPAN (Swift Parameter-free Attention Network, Wan et al. 2024), as published in its key layout.

Keys: `conv_1`, `block_1` … `block_6` (each `c1_r`, `c2_r`, `c3_r`), `conv_2`, `conv_cat` and
`upsampler.0`. Every `conv_*`/`c*_r` is a Conv3XC: a 1x1 skip (`sk`) plus a 1x1 -> 3x3 -> 1x1
branch (`conv.0..2`), all linear, so they fold into one 3x3 conv (`eval_conv`) at load time; the
file's own `eval_conv` tensors are recomputed from the branches, as the reference does.
Input is normalised as `(x - rgb_mean) * 255` unless the file holds a `no_norm` marker.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.upscalers.shapes import shuffle_scale

RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMG_RANGE = 255.0
NUM_BLOCKS = 6


class Conv3XC(nn.Module):
    """A 3x3 conv trained as skip + 1x1/3x3/1x1 branch; `fold()` merges the branch into `eval_conv`."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2) -> None:
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    @torch.no_grad()
    def fold(self) -> None:
        first, mid, last = self.conv
        w1, w3 = first.weight[:, :, 0, 0], last.weight[:, :, 0, 0]
        weight = torch.einsum("on,nmhw,mi->oihw", w3, mid.weight, w1)
        weight[:, :, 1, 1] += self.sk.weight[:, :, 0, 0]
        mid_bias = mid.weight.sum((2, 3)) @ first.bias + mid.bias
        self.eval_conv.weight.copy_(weight)
        self.eval_conv.bias.copy_(w3 @ mid_bias + last.bias + self.sk.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_conv(x)


class SPAB(nn.Module):
    """Three Conv3XC with SiLU between, then the parameter-free attention sigmoid(y) - 0.5.

    Also returns the first conv's activated output: the published code applies its SiLU in place,
    so the tensor it hands on to `conv_cat` is the activated one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = (Conv3XC(channels, channels) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out1 = F.silu(self.c1_r(x))
        out3 = self.c3_r(F.silu(self.c2_r(out1)))
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), out1


class SPAN(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, channels: int, scale: int, norm: bool) -> None:
        super().__init__()
        self.norm = norm
        mean = torch.tensor(RGB_MEAN) if in_ch == 3 else torch.zeros(in_ch)
        self.register_buffer("mean", mean.view(1, in_ch, 1, 1), persistent=False)
        self.conv_1 = Conv3XC(in_ch, channels)
        for i in range(1, NUM_BLOCKS + 1):
            self.add_module(f"block_{i}", SPAB(channels))
        self.conv_cat = nn.Conv2d(channels * 4, channels, 1)
        self.conv_2 = Conv3XC(channels, channels)
        self.upsampler = nn.Sequential(nn.Conv2d(channels, out_ch * scale * scale, 3, padding=1),
                                       nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:
            x = (x - self.mean.to(x.dtype)) * IMG_RANGE
        feature = self.conv_1(x)
        out, first = feature, feature
        for i in range(1, NUM_BLOCKS + 1):
            out, inner = getattr(self, f"block_{i}")(out)
            if i == 1:
                first = out
        return self.upsampler(self.conv_cat(torch.cat([feature, self.conv_2(out), first, inner], 1)))


def is_span(keys: set[str]) -> bool:
    return {"conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight", "upsampler.0.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded and folded, scale, label) for a SPAN state dict."""
    weights = {k: v for k, v in sd.items() if k != "no_norm"}
    first = weights["conv_1.sk.weight"]
    scale, out_ch = shuffle_scale(weights["upsampler.0.weight"].shape[0], first.shape[1], "SPAN")
    net = SPAN(first.shape[1], out_ch, first.shape[0], scale, norm="no_norm" not in sd)
    net.load_state_dict(weights, strict=True)
    fold_all(net)
    return net, scale, "SPAN"


def fold_all(net: nn.Module) -> None:
    """Recompute every Conv3XC's 3x3 conv from its branches (after loading, or after a dtype change)."""
    for module in net.modules():
        if isinstance(module, Conv3XC):
            module.fold()
