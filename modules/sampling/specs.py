"""Sampling specs: what a sampler and a schedule are, and what a schedule may read.

They live here, in the tensor layer, so that `sampling/` never imports the plugin
layer; `modules.plugins.specs` (and so `modules.plugins.api`) re-exports them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ScheduleContext:
    """What a schedule function may use to build its sigmas."""

    sigma_min: float
    sigma_max: float
    model_sigmas: torch.Tensor  # the model's discrete sigma table, ascending (1000 entries for SD)
    rho: float | None = None  # overrides the schedule's default rho when set
    arch: str = "sd1"  # "sd1", "sd1-inpaint", "sd2", "sd2-v" or "sdxl" (Align Your Steps tables differ)
    device: torch.device | str = "cpu"
    flow: bool = False  # a rectified-flow model (FLUX.1, SD3.5): samplers with a `flow` parameter get it


@dataclass(frozen=True)
class SchedulerSpec:
    """A noise schedule.

    `function(steps, context)` returns `steps + 1` descending sigmas that end in 0.
    `name` is A1111's API name ("karras"); `label` is what the UI and infotext show ("Karras").
    """

    name: str
    label: str
    function: Callable[[int, ScheduleContext], torch.Tensor]
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None
    need_inner_model: bool = False


@dataclass(frozen=True)
class SamplerSpec:
    """A k-diffusion-style sampler.

    `function(model, x, sigmas, extra_args=None, callback=None, disable=None,
    noise_sampler=None, **options) -> x`, where `model(x, sigma, **extra_args)`
    returns the denoised prediction and `noise_sampler(sigma, sigma_next)` returns
    fresh noise shaped like `x` from each image's own generator. A function with a
    `model_sigmas` parameter also gets the model's ascending discrete sigma table.
    """

    name: str
    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=_frozen)  # defaults, e.g. {"eta": 1.0}
    default_scheduler: str = "automatic"  # scheduler name that "Automatic" resolves to
    uses_noise: bool = False  # ancestral / SDE: draws from noise_sampler
    discard_next_to_last_sigma: bool = False  # DPM2 family, as in A1111
    second_order: bool = False  # calls the model about twice per step
    vp_start: bool = False  # start from unit noise in VP space, x = noise * sqrt(1 + sigma_0^2) (DDIM)
    brownian_noise: bool = False  # noise from per-image Brownian trees seeded by the job seeds (A1111's SDE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _frozen(self.options))
