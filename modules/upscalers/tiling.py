"""Tiled upscaling with overlap and feathered blending: bounded memory for any image size.

Tiles of `tile` input pixels overlap by `overlap`; each tile's output is weighted by a linear
ramp over the overlap on every side that meets another tile, and the weighted sum is normalised,
so seams blend and a tile that covers the whole image gives exactly the untiled result.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

AUTO_TILE_MIN, AUTO_TILE_MAX = 64, 1024
BYTES_PER_OUTPUT_PIXEL = 64 * 4 * 6  # 64 feature channels in float32, about six live buffers (RRDB)


def free_memory(device: torch.device) -> int:
    """Free bytes on `device` (host RAM available for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_tile(device: torch.device, scale: int, element_size: int = 4) -> int:
    """A tile side (input pixels) whose activations use at most a quarter of the free memory (4 GiB on CPU)."""
    budget = free_memory(device) // 4
    if device.type != "cuda":
        budget = min(budget, 4 << 30)
    per_pixel = BYTES_PER_OUTPUT_PIXEL * scale * scale * element_size // 4
    side = int((budget / per_pixel) ** 0.5) // 32 * 32
    return max(AUTO_TILE_MIN, min(AUTO_TILE_MAX, side))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, length) with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(size: int, ramp: int, before: bool, after: bool) -> torch.Tensor:
    weight = torch.ones(size)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        rising = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if before:
            weight[:ramp] = rising
        if after:
            weight[size - ramp:] = rising.flip(0)
    return weight


TileFn = Callable[[torch.Tensor], torch.Tensor]


def upscale_tiled(run: TileFn, x: torch.Tensor, scale: int, tile: int, overlap: int,
                  on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`run` over (1, C, H, W) `x` tile by tile -> (1, C', H*scale, W*scale) float32 on the CPU.

    `run` takes a (1, C, h, w) CPU tile and returns its (1, C', h*scale, w*scale) output;
    `on_tile(done, total)` is called after each tile. `tile` <= 0 runs the whole image at once.
    """
    _, _, height, width = x.shape
    if tile <= 0:
        tile = max(height, width)
    overlap = max(0, min(overlap, tile // 2))
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    total = len(ys) * len(xs)
    if total == 1:
        out = run(x).float().cpu()
        if on_tile is not None:
            on_tile(1, 1)
        return out
    out: torch.Tensor | None = None
    weights = torch.zeros(height * scale, width * scale)
    done = 0
    for y in ys:
        th = min(tile, height - y)
        wy = _ramp(th * scale, overlap * scale, y > 0, y + th < height)
        for x0 in xs:
            tw = min(tile, width - x0)
            result = run(x[:, :, y:y + th, x0:x0 + tw]).float().cpu()
            if out is None:
                out = torch.zeros(1, result.shape[1], height * scale, width * scale)
            wx = _ramp(tw * scale, overlap * scale, x0 > 0, x0 + tw < width)
            w = wy[:, None] * wx[None, :]
            region = (slice(y * scale, (y + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
            out[0, :, region[0], region[1]] += result[0] * w
            weights[region] += w
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    assert out is not None
    return out.div_(weights)
