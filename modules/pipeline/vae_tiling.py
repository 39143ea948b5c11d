"""Tiled VAE decode and encode: large images in bounded memory, without seams.

The latents (or pixels) are cut into overlapping tiles; each tile goes through the VAE on its
own and the results are blended with linear ramps across every overlap, so neighbouring tiles
fade into each other. Peak memory follows the tile size, not the image size.

GroupNorm normalises over the whole image in an untiled pass; per tile its statistics would
shift colours region by region. So a first pass runs the whole input downscaled to one tile,
recording every GroupNorm call's per-sample, per-group mean and variance, and the tiles then
normalise with those (call k of each tile with call k of that pass): the whole-image mean, and
as variance the larger of the recorded one and the tile's own spread about that mean (the
downscaled pass misses fine detail, so its variance runs low). The mid-block attention still
sees only its tile; the overlap hides the borders.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VAE_FACTOR = 8  # pixels per latent


@dataclass(frozen=True)
class VaeTiling:
    """Tile size and overlap in latents (64 and 16: 512-pixel tiles overlapping by 128 pixels);
    `shared_norms`: normalise tiles with whole-image GroupNorm statistics (off only to compare)."""

    tile: int = 64
    overlap: int = 16
    shared_norms: bool = True

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


# -- whole-image GroupNorm statistics ---------------------------------------------------------
Stats = tuple[torch.Tensor, torch.Tensor]  # per-sample, per-group mean and variance [B, G], float32


def _group_moments(x: torch.Tensor, groups: int) -> Stats:
    """Mean and (biased) variance of x [B, C, *] per sample and channel group, in float32.
    One group at a time, so the float32 copy stays small."""
    per = x.shape[1] // groups
    moments = [torch.var_mean(x[:, g * per:(g + 1) * per].float().flatten(1), dim=1, correction=0)
               for g in range(groups)]
    return torch.stack([m for _, m in moments], 1), torch.stack([v for v, _ in moments], 1)


def _normalise(norm: torch.nn.GroupNorm, x: torch.Tensor, stats: Stats) -> torch.Tensor:
    """GroupNorm of x with given statistics, then its affine weight and bias.

    As an eval-mode batch norm over [1, B*C, *]: one fused kernel that takes float32 statistics
    for a half-precision x, without a float32 copy of x."""
    mean, var = stats
    b, c = x.shape[:2]
    if mean.shape[0] != b:
        raise ValueError(f"GroupNorm statistics for batch {mean.shape[0]}, input batch {b}")
    per = c // norm.num_groups
    weight = norm.weight.float().repeat(b) if norm.affine else None
    bias = norm.bias.float().repeat(b) if norm.affine else None
    y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean.repeat_interleave(per, 1).flatten(),
                     var.repeat_interleave(per, 1).flatten(), weight, bias, False, 0.0, norm.eps)
    return y.reshape(x.shape)


@contextmanager
def _group_norms_replaced(net: torch.nn.Module,
                          forward: Callable[[torch.nn.GroupNorm, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Every GroupNorm in `net` runs `forward(module, x)` inside the block; restored after, also on errors."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    own = [m.__dict__.get("forward") for m in norms]  # an instance-level forward someone else set
    try:
        for m in norms:
            m.forward = lambda x, m=m: forward(m, x)
        yield
    finally:
        for m, previous in zip(norms, own, strict=True):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous


def record_group_norm_stats(net: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                            x: torch.Tensor) -> list[Stats]:
    """Run `fn(x)` and return the statistics of each GroupNorm call in `net`, in call order."""
    stats: list[Stats] = []

    def recording(norm: torch.nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
        stats.append(_group_moments(h, norm.num_groups))
        return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)

    with _group_norms_replaced(net, recording):
        fn(x)
    return stats


def _tile_stats(whole: Stats, tile: Stats) -> Stats:
    """The whole-image mean, and the larger of the whole-image variance and the tile's own spread
    about that mean: the downscaled pass misses fine detail, so its variance runs low."""
    mean, var = whole
    tile_mean, tile_var = tile
    return mean, torch.maximum(var, tile_var + (tile_mean - mean) ** 2)


@contextmanager
def replayed_group_norm_stats(net: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                              stats: list[Stats]) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield `fn` made to normalise its k-th GroupNorm call in `net` with `stats[k]` (see _tile_stats)."""
    calls = 0

    def replaying(norm: torch.nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if calls >= len(stats):
            raise RuntimeError(f"more GroupNorm calls than the {len(stats)} recorded")
        calls += 1
        return _normalise(norm, h, _tile_stats(stats[calls - 1], _group_moments(h, norm.num_groups)))

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls = 0
        out = fn(x)
        if calls != len(stats):
            raise RuntimeError(f"{calls} GroupNorm calls, {len(stats)} recorded")
        return out

    with _group_norms_replaced(net, replaying):
        yield run


def _downscaled(x: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """x [B, C, H, W] area-downscaled so its longer side is at most `side`, sizes a multiple of `multiple`."""
    h, w = x.shape[2:]
    scale = min(1.0, side / max(h, w))
    size = [max(multiple, int(n * scale) // multiple * multiple) for n in (h, w)]
    return x if size == [h, w] else F.interpolate(x.float(), size=size, mode="area")


@contextmanager
def _shared_norms(fn: Callable[[torch.Tensor], torch.Tensor], norm_net: torch.nn.Module | None,
                  whole: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield `fn` normalising with the GroupNorm statistics of `fn(whole)`; `fn` itself without a net."""
    if norm_net is None:
        yield fn
        return
    stats = record_group_norm_stats(norm_net, fn, whole)
    with replayed_group_norm_stats(norm_net, fn, stats) as shared:
        yield shared


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                 tiling: VaeTiling, norm_net: torch.nn.Module | None = None) -> torch.Tensor:
    """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (float32, CPU), through `decode` per tile.

    `norm_net` (the VAE or its decoder): its GroupNorms use the statistics of the whole latent
    downscaled to one tile, when tiling.shared_norms."""
    net = norm_net if tiling.shared_norms else None
    with _shared_norms(decode, net, _downscaled(latents, tiling.tile, 1)) as fn:
        return _blend(latents, fn, tiling.tile, tiling.overlap, VAE_FACTOR, 3)


def tiled_encode(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tiling: VaeTiling,
                 latent_channels: int = 4, norm_net: torch.nn.Module | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] -> latents [B, C, H/8, W/8] (float32, CPU), through `encode` per pixel tile;
    `norm_net` as for tiled_decode (the whole image downscaled to one tile)."""
    tile, overlap = tiling.tile * VAE_FACTOR, tiling.overlap * VAE_FACTOR
    net = norm_net if tiling.shared_norms else None
    with _shared_norms(encode, net, _downscaled(images, tile, VAE_FACTOR)) as fn:
        return _blend(images, fn, tile, overlap, 1 / VAE_FACTOR, latent_channels)
