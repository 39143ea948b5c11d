"""Shifted-window transformer parts shared by SwinIR and HAT (Liu et al. 2021, "Swin Transformer").

Tokens are (B, H*W, C) with the image size passed alongside. Attention runs inside ws x ws
windows with a learned bias per (relative offset, head); every second block shifts the windows
by ws // 2 and masks pairs of tokens that the roll brought together from different image regions.
Key names follow the published checkpoints (`norm1`, `attn.qkv`, `attn.proj`,
`attn.relative_position_bias_table`, `mlp.fc1`, `mlp.fc2`, ...).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError

MASKED = -100.0  # the published models' additive mask value for token pairs from different regions


def pad_to_window(x: torch.Tensor, ws: int) -> torch.Tensor:
    """Reflect-pad an image (B, C, H, W) on the bottom and right to multiples of `ws`."""
    h, w = x.shape[2:]
    return F.pad(x, (0, -w % ws, 0, -h % ws), mode="reflect") if h % ws or w % ws else x


def to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, ws * ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def from_windows(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_windows`: (B * windows, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each token of a size x size window, flattened row-major."""
    idx = torch.arange(size)
    return idx.repeat_interleave(size), idx.repeat(size)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws², ws²) index into a ((2ws-1)², heads) bias table for each query/key pair of a window."""
    row, col = _grid(ws)
    dy = row[:, None] - row[None, :] + ws - 1
    dx = col[:, None] - col[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def overlap_position_index(ws: int, ows: int) -> torch.Tensor:
    """HAT's (ws², ows²) index from a query window into its enlarged key window.

    The published formula offsets by ws - ows + 1, which leaves some offsets negative; they wrap
    to the end of the ((ws + ows - 1)², heads) table, which is what the released weights learned.
    """
    q_row, q_col = _grid(ws)
    k_row, k_col = _grid(ows)
    dy = k_row[None, :] - q_row[:, None] + ws - ows + 1
    dx = k_col[None, :] - q_col[:, None] + ws - ows + 1
    return (dy * (ws + ows - 1) + dx) % (ws + ows - 1) ** 2


def _regions(n: int, ws: int, shift: int) -> torch.Tensor:
    idx = torch.arange(n)
    return (idx >= n - ws).long() + (idx >= n - shift).long()


def shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(windows, ws², ws²) additive mask for windows shifted by `shift` on an h x w image."""
    labels = _regions(h, ws, shift)[:, None] * 3 + _regions(w, ws, shift)[None, :]
    windows = to_windows(labels[None, :, :, None].float(), ws).squeeze(-1)
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape).masked_fill_(different, MASKED)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, C) -> (N, heads, L, C / heads)."""
    n, length, c = t.shape
    return t.view(n, length, heads, c // heads).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention over windows: q (N, Lq, C), k/v (N, Lk, C), bias (heads, Lq, Lk),
    mask (windows, Lq, Lk) repeated over the batch -> (N, Lq, C)."""
    n, lq, c = q.shape
    add = bias[None].to(q.dtype)
    if mask is not None:  # windows of each image in turn: the same mask for every image of the batch
        add = add + mask[:, None].to(q.dtype)
        add = add[None].expand(n // add.shape[0], *add.shape).reshape(n, *add.shape[1:])
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=add)
    return out.transpose(1, 2).reshape(n, lq, c)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Self-attention inside windows with a relative position bias (keys `attn.*`)."""

    def __init__(self, dim: int, ws: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1)
        return self.proj(attention(q, k, v, self.heads, bias, mask))


class SwinBlock(nn.Module):
    """(Shifted) window attention then an MLP, each with a pre-norm and a residual."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def attend(self, h: torch.Tensor, size: tuple[int, int], index: torch.Tensor, mask: torch.Tensor | None
               ) -> torch.Tensor:
        """Window attention over normalised tokens h (B, H*W, C), shifting first on odd blocks."""
        height, width = size
        img = h.view(h.shape[0], height, width, h.shape[2])
        s = self.shift
        if s:
            img = torch.roll(img, (-s, -s), dims=(1, 2))
        out = from_windows(self.attn(to_windows(img, self.ws), index, mask if s else None), self.ws, height, width)
        if s:
            out = torch.roll(out, (s, s), dims=(1, 2))
        return out.reshape(h.shape)

    def forward(self, x: torch.Tensor, size: tuple[int, int], index: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.attend(self.norm1(x), size, index, mask)
        return x + self.mlp(self.norm2(x))


class PatchNorm(nn.Module):
    """Image <-> tokens, with the optional LayerNorm after flattening (key `patch_embed.norm`)."""

    def __init__(self, dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return self.norm(tokens) if self.norm is not None else tokens


def tokens_to_image(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *size)


def pixelshuffle_scale(sd: dict[str, torch.Tensor], prefix: str, num_feat: int) -> int:
    """Scale of the (conv, PixelShuffle) pairs at `prefix`.0, .2, ...: 2 ** pairs, or 3 from one pair."""
    steps = sorted(int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.weight$", k)))
    factors = []
    for step in steps:
        outputs = sd[f"{prefix}.{step}.weight"].shape[0]
        factors.append(math.isqrt(outputs // num_feat))
        if factors[-1] not in (2, 3) or outputs != factors[-1] ** 2 * num_feat:
            raise CheckpointError(f"{prefix}.{step} has {outputs} outputs for {num_feat} features; "
                                  "expected 4x or 9x (pixel shuffle 2 or 3)")
    if 3 in factors and len(factors) > 1:
        raise CheckpointError(f"{prefix}: a pixel shuffle by 3 comes alone, not among {len(factors)} steps")
    return math.prod(factors)


def pixelshuffle_upsample(scale: int, num_feat: int) -> nn.Sequential:
    """(conv, PixelShuffle) pairs as the checkpoints hold them: one by 3, or log2(scale) by 2."""
    factors = [3] if scale == 3 else [2] * int(math.log2(scale))
    layers: list[nn.Module] = []
    for factor in factors:
        layers += [nn.Conv2d(num_feat, factor * factor * num_feat, 3, 1, 1), nn.PixelShuffle(factor)]
    return nn.Sequential(*layers)


def count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices fill the `(\\d+)` group of `pattern` among the keys."""
    compiled = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := compiled.match(k))})


def window_from_table(table: torch.Tensor, other: int | None = None) -> int:
    """Window side from a bias table of (2ws-1)² rows, or (ws + other - 1)² rows when `other` is given."""
    side = math.isqrt(table.shape[0])
    ws = (side + 1) // 2 if other is None else side + 1 - other
    if side * side != table.shape[0] or ws < 1:
        raise CheckpointError(f"relative position bias table with {table.shape[0]} rows is not a square window")
    return ws


MEAN_RGB = (0.4488, 0.4371, 0.4040)  # DIV2K mean the published SwinIR/HAT models subtract from RGB input


def image_mean(channels: int) -> torch.Tensor:
    return torch.tensor(MEAN_RGB if channels == 3 else (0.0,) * channels).view(1, channels, 1, 1)
