"""Noise samplers for ancestral and SDE samplers: `noise_sampler(sigma, sigma_next) -> unit noise`.

`BrownianTreeNoise` is k-diffusion's `BrownianTreeNoiseSampler` with one seed per image, which
A1111 builds from the job's seeds for its "brownian noise" samplers (DPM++ SDE, 2M SDE, 3M SDE):
the noise over [sigma_next, sigma] is the increment of a Brownian motion W that `torchsde`
draws from the image's seed, divided by sqrt(sigma - sigma_next). The same seed gives the
same path whatever the step count's subdivision, so half-step and full-step draws stay
consistent (W(a, c) = W(a, b) + W(b, c)).

`SequentialNoise` draws fresh per-image noise on each call from the images' own generators
(what Atelier did before; cheaper, but matches neither A1111 nor ComfyUI for SDE samplers).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torchsde

from modules.errors import InvalidParams


class BrownianTreeNoise:
    """Per-image Brownian trees over [sigma_min, sigma_max], seeded like A1111 (`torchsde.BrownianTree`).

    `x` gives the shape, dtype and device of the noise (one tree per image, x.shape[0] == len(seeds)).
    """

    brownian = True

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int]) -> None:
        if len(seeds) != x.shape[0]:
            raise InvalidParams(f"Brownian noise needs one seed per image: {len(seeds)} seeds for {x.shape[0]} images.")
        if not 0 < sigma_min < sigma_max:
            raise InvalidParams(f"Brownian noise needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
        self.t0, self.t1 = float(sigma_min), float(sigma_max)
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if float(sigma) < float(sigma_next) else -1.0
        a, b = max(a, self.t0), min(b, self.t1)  # k-diffusion's trees clamp queries to their span
        with warnings.catch_warnings():  # torchsde compares float32-rounded ends: "Should have tb<=t1 ..."
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * sign
        return w / abs(float(sigma_next) - float(sigma)) ** 0.5


class SequentialNoise:
    """Fresh unit noise on each call from `draw()` (the images' generators), ignoring the sigmas."""

    brownian = False

    def __init__(self, draw: Callable[[], torch.Tensor]) -> None:
        self.draw = draw

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        return self.draw()

