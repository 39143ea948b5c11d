"""Tiled VAE decode and encode: large images in bounded memory, without seams.

The latents (or pixels) are cut into overlapping tiles; each tile goes through the VAE on its
own and the results are blended with linear ramps across every overlap, so neighbouring tiles
fade into each other. Peak memory follows the tile size, not the image size. Tiles see only
their own context (GroupNorm statistics and the mid-block attention are per tile), so the
result differs slightly from an untiled pass; the overlap hides the borders.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VAE_FACTOR = 8  # pixels per latent


@dataclass(frozen=True)
class VaeTiling:
    """Tile size and overlap in latents (64 and 16: 512-pixel tiles overlapping by 128 pixels)."""

    tile: int = 64
    overlap: int = 16

    def __post_init__(self) -> None:
        if self.tile < 8 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"VAE tiles need tile >= 8 and 0 <= overlap < tile (got {self.tile}, {self.overlap})")

    def needed(self, latent_h: int, latent_w: int) -> bool:
        return latent_h > self.tile or latent_w > self.tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with `tile`-long tiles overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(n: int, before: int, after: int) -> torch.Tensor:
    """1-D weights: rising over the first `before` entries, falling over the last `after`, 1 between."""
    w = torch.ones(n)
    if before:
        w[:before] = (torch.arange(before) + 0.5) / before
    if after:
        w[n - after:] = torch.minimum(w[n - after:], (torch.arange(after, 0, -1) - 0.5) / after)
    return w


def _blend(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int,
           scale: float, out_channels: int) -> torch.Tensor:
    """Apply `fn` tile by tile over `x` [B, C, H, W]; its output is `scale` times the size (1/8 or 8)."""
    b, _, h, w = x.shape
    out_h, out_w = round(h * scale), round(w * scale)
    out = torch.zeros(b, out_channels, out_h, out_w)
    weight = torch.zeros(1, 1, out_h, out_w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for i, y in enumerate(ys):
        th = min(tile, h)
        for j, x0 in enumerate(xs):
            tw = min(tile, w)
            piece = fn(x[:, :, y:y + th, x0:x0 + tw]).float().cpu()
            oy, ox, oh, ow = round(y * scale), round(x0 * scale), piece.shape[2], piece.shape[3]
            # Ramp across the real overlap with each neighbour (the last tile may overlap more).
            top = round((ys[i - 1] + th - y) * scale) if i else 0
            bottom = round((y + th - ys[i + 1]) * scale) if i + 1 < len(ys) else 0
            left = round((xs[j - 1] + tw - x0) * scale) if j else 0
            right = round((x0 + tw - xs[j + 1]) * scale) if j + 1 < len(xs) else 0
            mask = _ramp(oh, top, bottom)[:, None] * _ramp(ow, left, right)[None, :]
            out[:, :, oy:oy + oh, ox:ox + ow] += piece * mask
            weight[:, :, oy:oy + oh, ox:ox + ow] += mask
    return out / weight


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                 tiling: VaeTiling) -> torch.Tensor:
    """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (float32, CPU), through `decode` per tile."""
    return _blend(latents, decode, tiling.tile, tiling.overlap, VAE_FACTOR, 3)


def tiled_encode(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tiling: VaeTiling,
                 latent_channels: int = 4) -> torch.Tensor:
    """Images [B, 3, H, W] -> latents [B, C, H/8, W/8] (float32, CPU), through `encode` per pixel tile."""
    return _blend(images, encode, tiling.tile * VAE_FACTOR, tiling.overlap * VAE_FACTOR, 1 / VAE_FACTOR,
                  latent_channels)
