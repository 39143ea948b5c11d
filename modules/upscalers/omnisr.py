"""OmniSR (Omni Aggregation Networks, Wang et al. CVPR 2023), as published in its key layout.

Keys: `input` (first conv), `residual_layer.G` (OSAG groups: `residual_layer.B` OSA blocks, then a
1x1 conv, then `esa`), `output` (conv), `up.0` (pixel-shuffle conv). An OSA block is a Sequential
of 13 steps (`layer.0..12`): MBConv, block-window self-attention, gated FFN, block channel
attention, gated FFN, grid self-attention, gated FFN, grid channel attention, gated FFN; the four
re-arrangement steps hold no weights. Images are zero-padded to the window (and to at least
16 px, which the ESA's strided conv and 7x7 pooling need) and the output cropped back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError
from modules.upscalers.shapes import seq_len, shuffle_scale

MIN_SIZE = 16
HEADS = 4  # both attentions split the channels into 4 heads
THOP_SUFFIXES = ("total_ops", "total_params")  # FLOP counters some releases saved with the weights


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / (var + 1e-6).sqrt() * self.weight[:, None, None] + self.bias[:, None, None]


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int(dim * 0.25)
        # index 0 is the (weightless) global mean; 5 the reshape back
        self.gate = nn.Sequential(nn.Identity(), nn.Linear(dim, hidden, bias=False), nn.SiLU(),
                                  nn.Linear(hidden, dim, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]


class MBConv(nn.Module):
    """1x1, depthwise 3x3, squeeze-excite, 1x1, with a residual (expansion 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fn = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                                nn.GELU(), SqueezeExcite(dim), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def relative_index(window: int) -> torch.Tensor:
    """(w², w²) indices into the (2w-1)² relative-position table, positions row-major."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)
    rel = pos[:, None, :] - pos[None, :, :] + window - 1
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows, with an optional learned relative-position bias.

    Takes (B, X, Y, w, w, C) and returns the same shape.
    """

    def __init__(self, dim: int, window: int, with_pe: bool) -> None:
        super().__init__()
        self.heads = HEADS
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False))
        if with_pe:
            self.rel_pos_bias = nn.Embedding((2 * window - 1) ** 2, self.heads)
            self.register_buffer("rel_pos_indices", relative_index(window), persistent=False)
        else:
            self.rel_pos_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[3] * shape[4], shape[5])
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(tokens).chunk(3, -1))
        bias = None
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias(self.rel_pos_indices).permute(2, 0, 1).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out(out.transpose(1, 2).flatten(2)).reshape(shape)


class PreNorm(nn.Module):
    """x + fn(norm(x)); `channels_first` picks the NCHW channel norm, else LayerNorm on the last dim."""

    def __init__(self, dim: int, fn: nn.Module, channels_first: bool) -> None:
        super().__init__()
        self.norm = ChannelNorm(dim) if channels_first else nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


class GatedFeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(dim, dim * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, 1)
        return self.project_out(F.gelu(gate) * value)


class ChannelAttention(nn.Module):
    """Transposed (channel x channel) attention with cosine similarity and a learned temperature.

    `grid=False` attends within each w x w window (over its pixels); `grid=True` within each
    of the w² grid positions (over the pixels at that offset in every window).
    """

    def __init__(self, dim: int, window: int, grid: bool) -> None:
        super().__init__()
        self.window, self.grid = window, grid
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        p = self.window
        t = t.reshape(b, HEADS, c // HEADS, h // p, p, w // p, p)
        order = (0, 4, 6, 1, 2, 3, 5) if self.grid else (0, 3, 5, 1, 2, 4, 6)
        t = t.permute(order)
        return t.reshape(b, -1, HEADS, c // HEADS, t.shape[-2] * t.shape[-1])

    def _merge(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape
        p = self.window
        if self.grid:  # (b, p*p, head, d, h/p * w/p)
            t = t.reshape(b, p, p, HEADS, c // HEADS, h // p, w // p).permute(0, 3, 4, 5, 1, 6, 2)
        else:  # (b, h/p * w/p, head, d, p*p)
            t = t.reshape(b, h // p, w // p, HEADS, c // HEADS, p, p).permute(0, 3, 4, 1, 5, 2, 6)
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(t) for t in self.qkv_dwconv(self.qkv(x)).chunk(3, 1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        return self.project_out(self._merge(attn @ v, x.shape))


class Partition(nn.Module):
    """NCHW <-> (B, X, Y, w, w, C) windows: `grid=False` takes contiguous w x w blocks, `grid=True`
    takes every (H/w)-th pixel (a dilated grid); `merge=True` is the inverse."""

    def __init__(self, window: int, grid: bool, merge: bool) -> None:
        super().__init__()
        self.window, self.grid, self.merge = window, grid, merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.window
        if self.merge:
            b, nx, ny, _, _, c = x.shape
            order = (0, 5, 3, 1, 4, 2) if self.grid else (0, 5, 1, 3, 2, 4)
            return x.permute(order).reshape(b, c, nx * p, ny * p)
        b, c, h, w = x.shape
        if self.grid:
            return x.reshape(b, c, p, h // p, p, w // p).permute(0, 3, 5, 2, 4, 1)
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)


class OSABlock(nn.Module):
    def __init__(self, dim: int, window: int, with_pe: bool) -> None:
        super().__init__()

        def ffn() -> nn.Module:
            return PreNorm(dim, GatedFeedForward(dim), channels_first=True)

        def part(grid: bool, merge: bool) -> nn.Module:
            return Partition(window, grid, merge)

        self.layer = nn.Sequential(
            MBConv(dim),
            part(False, False), PreNorm(dim, WindowAttention(dim, window, with_pe), False), part(False, True),
            ffn(), PreNorm(dim, ChannelAttention(dim, window, grid=False), True), ffn(),
            part(True, False), PreNorm(dim, WindowAttention(dim, window, with_pe), False), part(True, True),
            ffn(), PreNorm(dim, ChannelAttention(dim, window, grid=True), True), ffn(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ESA(nn.Module):
    """Enhanced spatial attention: a strided, max-pooled low-resolution mask, upsampled and applied."""

    def __init__(self, esa_ch: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, esa_ch, 1)
        self.conv_f = nn.Conv2d(esa_ch, esa_ch, 1)
        self.conv2 = nn.Conv2d(esa_ch, esa_ch, 3, stride=2)
        self.conv3 = nn.Conv2d(esa_ch, esa_ch, 3, padding=1)
        self.conv4 = nn.Conv2d(esa_ch, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)
        low = self.conv3(F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3))
        low = F.interpolate(low, x.shape[2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(low + self.conv_f(reduced)))


class OSAG(nn.Module):
    def __init__(self, dim: int, blocks: int, window: int, with_pe: bool, bias: bool) -> None:
        super().__init__()
        self.residual_layer = nn.Sequential(*(OSABlock(dim, window, with_pe) for _ in range(blocks)),
                                            nn.Conv2d(dim, dim, 1, bias=bias))
        self.esa = ESA(max(dim // 4, 16), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.esa(self.residual_layer(x) + x)


class OmniSR(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dim: int, groups: int, blocks: int, window: int,
                 with_pe: bool, scale: int, bias: bool) -> None:
        super().__init__()
        self.window, self.scale = window, scale
        self.input = nn.Conv2d(in_ch, dim, 3, padding=1, bias=bias)
        self.residual_layer = nn.Sequential(*(OSAG(dim, blocks, window, with_pe, bias) for _ in range(groups)))
        self.output = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.up = nn.Sequential(nn.Conv2d(dim, out_ch * scale * scale, 3, padding=1, bias=bias),
                                nn.PixelShuffle(scale))

    def _padded(self, size: int) -> int:
        size = max(size, MIN_SIZE)
        return size + -size % self.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = F.pad(x, (0, self._padded(w) - w, 0, self._padded(h) - h))
        residual = self.input(x)
        out = self.output(self.residual_layer(residual)) + residual
        return self.up(out)[:, :, : h * self.scale, : w * self.scale]


def is_omnisr(keys: set[str]) -> bool:
    return {"input.weight", "up.0.weight", "residual_layer.0.residual_layer.0.layer.0.fn.0.weight"} <= keys


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded, scale, label) for an OmniSR state dict."""
    weights = {k: v for k, v in sd.items() if not k.endswith(THOP_SUFFIXES)}
    first = weights["input.weight"]
    dim, in_ch = first.shape[:2]
    if dim % HEADS:
        raise CheckpointError(f"OmniSR: {dim} features are not divisible into {HEADS} heads")
    scale, out_ch = shuffle_scale(weights["up.0.weight"].shape[0], in_ch, "OmniSR")
    bias_key = "residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight"
    window = (math.isqrt(weights[bias_key].shape[0]) + 1) // 2 if bias_key in weights else 8
    net = OmniSR(in_ch, out_ch, dim, groups=seq_len(weights, "residual_layer"),
                 blocks=seq_len(weights, "residual_layer.0.residual_layer") - 1, window=window,
                 with_pe=bias_key in weights, scale=scale, bias="input.bias" in weights)
    net.load_state_dict(weights, strict=True)
    return net, scale, "OmniSR"
