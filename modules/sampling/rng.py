"""Seeds and latent noise with A1111's semantics (v1.10), so shared settings reproduce.

Three noise sources:

- ``"cpu"``: ``torch.Generator("cpu").manual_seed(seed)`` then ``torch.randn``.
- ``"gpu"``: the CUDA generator when ``device`` is a CUDA device. On any other device
  (CPU, MPS, ...) it falls back to the ``"cpu"`` source, as A1111 does for MPS.
- ``"nv"``: Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as
  1, 2, 3", SC 2011) with the Box–Muller transform, evaluated on the CPU with
  numpy. It reproduces what ``torch.randn`` gives on a CUDA device for the same seed
  (last-bit differences aside: the transform runs in float64, as A1111's NV does).

Every image of a batch draws from its own generator, so the batch size never
changes an image (`ImageNoise`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from modules.errors import InvalidParams

RNG_SOURCES = ("gpu", "cpu", "nv")
SEED_LIMIT = 2**32  # user seeds live in [0, 2**32)
RANDOM_SEED_MAX = 2**32 - 2  # a random seed is drawn from [0, RANDOM_SEED_MAX]

# Philox 4x32 multipliers and Weyl key increments (Random123, philox.h).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)

# curand's Box–Muller constants, rounded to float32 as curand and A1111 round them.
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


class NoiseGenerator(Protocol):
    """A seeded stream of float32 standard normal noise on a given device."""

    def randn(self, shape: Sequence[int]) -> torch.Tensor: ...


# ---------------------------------------------------------------- Philox ("nv")


def philox4x32_10(counter: np.ndarray, key: Sequence[int], rounds: int = 10) -> np.ndarray:
    """The Philox-4x32 block function (10 rounds by default).

    `counter` is a (4, N) array of uint32 words; `key` two uint32 words. Returns the
    (4, N) uint32 output blocks.
    """
    c = [np.asarray(counter[i], dtype=np.uint64) for i in range(4)]
    k0, k1 = np.uint64(int(key[0]) & 0xFFFFFFFF), np.uint64(int(key[1]) & 0xFFFFFFFF)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    w0, w1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & _MASK32, (k1 + w1) & _MASK32
        p0 = c[0] * m0  # full 64-bit products of two 32-bit words: no overflow
        p1 = c[2] * m1
        c = [(p1 >> _SHIFT32) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c[3] ^ k1, p0 & _MASK32]
    return np.stack(c).astype(np.uint32)


def box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first (sine) output of curand's Box–Muller on two uint32 words, as float32."""
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """CUDA ``torch.randn`` reproduced on the CPU (A1111's "NV" source).

    Element i of call number `offset` uses counter ``[offset, 0, i, 0]`` and key
    ``[seed low 32 bits, seed high 32 bits]``; each call advances `offset` by one, as a
    CUDA randn of fewer elements than the GPU has threads does.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = _seed_u64(seed)
        self.offset = 0
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        if n >= 2**32:
            raise InvalidParams(f"NV noise is limited to 2**32 elements per draw, got shape {tuple(shape)}.")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset & 0xFFFFFFFF
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        block = philox4x32_10(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        z = box_muller_sin(block[0], block[1]).reshape(tuple(shape))
        return torch.from_numpy(z).to(self.device)


# ---------------------------------------------------------------- torch sources


class TorchGenerator:
    """A `torch.Generator` stream; draws on `draw_device`, returns on `device`."""

    def __init__(self, seed: int, draw_device: torch.device, device: torch.device) -> None:
        self.draw_device = draw_device
        self.device = device
        self.generator = torch.Generator(draw_device).manual_seed(_seed_u64(seed))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        x = torch.randn(tuple(shape), generator=self.generator, device=self.draw_device, dtype=torch.float32)
        return x.to(self.device)


def check_source(source: str) -> str:
    """Normalise an RNG source name ("GPU", "cpu", "NV", ...) or raise InvalidParams."""
    name = source.lower() if isinstance(source, str) else source
    if name not in RNG_SOURCES:
        raise InvalidParams(f"Unknown RNG source {source!r}; expected one of: GPU, CPU, NV.")
    return name


def create_generator(seed: int, source: str = "cpu", device: torch.device | str = "cpu") -> NoiseGenerator:
    """A fresh noise stream for `seed` whose draws land on `device`."""
    name = check_source(source)
    dev = torch.device(device)
    if name == "nv":
        return PhiloxGenerator(seed, dev)
    if name == "gpu" and dev.type == "cuda":
        return TorchGenerator(seed, dev, dev)
    return TorchGenerator(seed, torch.device("cpu"), dev)  # "cpu", or "gpu" without CUDA


def randn(
    seed: int, shape: Sequence[int], source: str = "cpu", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Float32 standard normal noise of `shape`: the first draw of `seed`'s stream."""
    return create_generator(seed, source, device).randn(_check_shape(shape))


def _seed_u64(seed: int) -> int:
    """A seed as the uint64 torch would use: negatives wrap (two's complement)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidParams(f"A seed must be an integer, got {seed!r}.")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise InvalidParams(f"Seed {seed} is out of range for a 64-bit generator.")
    return seed % 2**64


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        raise InvalidParams(f"A noise shape needs positive integer sizes, got {shape!r}.")
    return dims


# ---------------------------------------------------------------- slerp


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (val=0) to `high` (val=1), as A1111 does it.

    Vectors are taken along dim 1 (for a (C, H, W) latent, each (c, w) column over H);
    the angle comes from the normalised vectors, the weights apply to the raw ones.
    When the mean cosine exceeds 0.9995 it falls back to linear interpolation.
    (A1111's fallback swaps the two weights; ours keeps val=0 -> low, and the two
    only differ for nearly parallel but unequal noises, which seeds never give.)
    """
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * (1.0 - val) + high * val
    omega = torch.acos(dot)
    so = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1)
    w_high = (torch.sin(val * omega) / so).unsqueeze(1)
    return w_low * low + w_high * high


# ---------------------------------------------------------------- per-image noise


def paste_centred(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy `src` (C, h, w) into `dst` (C, H, W) centred, cropping when larger.

    Offsets are floor((H - h) / 2) like A1111's, and so is its one quirk: when `src`
    is larger by an odd amount, the copied extent is ``h - 2*ceil((h - H) / 2)``, one
    short of H, leaving the last row/column of `dst` as it was.
    """
    out = dst.clone()
    (_, big_h, big_w), (_, h, w) = dst.shape, src.shape
    ty, sy, ch = _centre_span(big_h, h)
    tx, sx, cw = _centre_span(big_w, w)
    out[:, ty : ty + ch, tx : tx + cw] = src[:, sy : sy + ch, sx : sx + cw]
    return out


def _centre_span(size_new: int, size_old: int) -> tuple[int, int, int]:
    """(target start, source start, length) along one axis."""
    d = (size_new - size_old) // 2
    if d >= 0:
        return d, 0, size_old
    return 0, -d, size_old + 2 * d


class ImageNoise:
    """The latent noise of one batch; each image keeps its own generator stream.

    `first()` gives the initial noise (variation seed and resize-seed-from applied);
    `next()` continues every image's stream for ancestral and SDE samplers, and
    returns `first()` when nothing was drawn yet (as A1111's ``ImageRNG.next``). With
    a non-zero `eta_noise_seed_delta` the streams restart from ``seed + delta`` after
    the first draw. Calling `first()` again restarts all streams.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        seeds: list[int],
        subseeds: list[int] | None = None,
        subseed_strength: float = 0.0,
        resize_from: tuple[int, int] | None = None,
        source: str = "cpu",
        device: torch.device | str = "cpu",
        eta_noise_seed_delta: int = 0,
    ) -> None:
        self.shape = _check_shape(shape)
        if len(self.shape) != 3:
            raise InvalidParams(f"Latent noise shape must be (C, H, W), got {shape!r}.")
        if not seeds:
            raise InvalidParams("A batch needs at least one seed.")
        for s in seeds:
            _seed_u64(s)
        self.seeds = [int(s) for s in seeds]
        self.subseed_strength = _check_strength(subseed_strength)
        self.subseeds = self._check_subseeds(subseeds)
        self.noise_shape = self._check_resize(resize_from)
        self.source = check_source(source)
        self.device = torch.device(device)
        if isinstance(eta_noise_seed_delta, bool) or not isinstance(eta_noise_seed_delta, int):
            raise InvalidParams(f"Eta noise seed delta must be an integer, got {eta_noise_seed_delta!r}.")
        self.eta_noise_seed_delta = eta_noise_seed_delta
        self._generators: list[NoiseGenerator] | None = None

    def _check_subseeds(self, subseeds: list[int] | None) -> list[int] | None:
        if self.subseed_strength == 0:
            return list(subseeds) if subseeds is not None else None
        if subseeds is None or len(subseeds) < len(self.seeds):
            raise InvalidParams("A variation strength above 0 needs one variation seed per image.")
        for s in subseeds:
            _seed_u64(s)
        return [int(s) for s in subseeds]

    def _check_resize(self, resize_from: tuple[int, int] | None) -> tuple[int, int, int]:
        if resize_from is None:
            return self.shape
        dims = tuple(resize_from)
        if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
            raise InvalidParams(
                f"Resize seed from needs a positive (height, width) latent size, got {resize_from!r}."
            )
        return (self.shape[0], dims[0], dims[1])

    def _make(self, seed: int) -> NoiseGenerator:
        return create_generator(seed, self.source, self.device)

    def first(self) -> torch.Tensor:
        """The initial noise, (B, C, H, W) float32 on `device`."""
        self._generators = [self._make(s) for s in self.seeds]
        xs = [self._first_image(i) for i in range(len(self.seeds))]
        if self.eta_noise_seed_delta:
            self._generators = [self._make(s + self.eta_noise_seed_delta) for s in self.seeds]
        return torch.stack(xs)

    def _first_image(self, i: int) -> torch.Tensor:
        seed, generator = self.seeds[i], self._generators[i]
        resized = self.noise_shape != self.shape
        # Without resize the image's own stream draws; with it, a fresh one of the same seed.
        noise = self._make(seed).randn(self.noise_shape) if resized else generator.randn(self.shape)
        if self.subseed_strength > 0:
            subnoise = self._make(self.subseeds[i]).randn(self.noise_shape)
            noise = slerp(self.subseed_strength, noise, subnoise)
        if resized:
            noise = paste_centred(generator.randn(self.shape), noise)
        return noise

    def next(self) -> torch.Tensor:
        """The next noise of every image's stream, (B, C, H, W)."""
        if self._generators is None:
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self._generators])


def _check_strength(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidParams(f"Variation strength must be a number from 0 to 1, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------- seeds


def resolve_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """-1 or None: a random seed in [0, 2**32 - 2]; otherwise the seed, checked to lie in [0, 2**32)."""
    if seed is None or (not isinstance(seed, bool) and seed == -1):
        return (rng or random.Random()).randint(0, RANDOM_SEED_MAX)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidParams(f"A seed must be an integer, got {seed!r}.")
    if not 0 <= seed < SEED_LIMIT:
        raise InvalidParams(f"Seed {seed} is out of range: use -1 for random, or 0 to {SEED_LIMIT - 1}.")
    return int(seed)


def batch_seeds(
    seed: int | None,
    subseed: int | None,
    subseed_strength: float,
    count: int,
    rng: random.Random | None = None,
) -> tuple[list[int], list[int]]:
    """Per-image (seeds, subseeds) of a job of `count` images, -1 resolved first.

    Image i uses seed + i; with a variation strength above 0 every image keeps the
    same seed instead. Subseeds always count up: subseed + i.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidParams(f"The number of images must be a positive integer, got {count!r}.")
    strength = _check_strength(subseed_strength)
    base, sub = resolve_seed(seed, rng), resolve_seed(subseed, rng)
    seeds = [base + (i if strength == 0 else 0) for i in range(count)]
    return seeds, [sub + i for i in range(count)]
