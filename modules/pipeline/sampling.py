"""The sampling stage's pieces: a plan from the sampler registry (sigmas, options) and one
sampler run that returns its latents with how it ended (`Sampled`)."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from modules.errors import InvalidParams
from modules.pipeline.hooks import Denoiser
from modules.sampling import samplers_flow, schedules
from modules.sampling.denoisers import StopSampling
from modules.sampling.noise import BrownianTreeNoise, SequentialNoise
from modules.sampling.specs import SamplerSpec, ScheduleContext, SchedulerSpec

SAMPLER_OPTION_FIELDS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
SDE_NOISE_MODES = ("brownian", "sequential")  # Settings.sde_noise


class SamplerRegistries(Protocol):
    """The registries the pipeline reads (the plugin layer's `Registries` has them)."""

    samplers: Any  # NamedRegistry[SamplerSpec]: get(name)
    schedulers: Any  # NamedRegistry[SchedulerSpec]
    upscalers: Any  # NamedRegistry[UpscalerSpec]


@dataclass(frozen=True)
class Sampled:
    """A sampling pass's latents; `stop` is None, or "interrupt" / "skip" when it ended early."""

    latents: torch.Tensor
    stop: str | None = None
    warnings: tuple[str, ...] = ()  # e.g. the VAE's fp32 fallback while the hires pass decoded


@dataclass(frozen=True)
class SamplingPlan:
    sampler: SamplerSpec
    scheduler: SchedulerSpec
    sigmas: torch.Tensor
    options: dict[str, Any]


def sampler_options(sampler: SamplerSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """The spec's defaults, then the job's non-None overrides the function accepts."""
    accepted = inspect.signature(sampler.function).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    options = dict(sampler.options)
    for key, value in overrides.items():
        if value is not None and (key in accepted or key in options or takes_kwargs):
            options[key] = value
    return {k: v for k, v in options.items() if k in accepted or takes_kwargs}


def plan_sampling(registries: SamplerRegistries, sampler_name: str, scheduler_name: str, steps: int,
                  context: ScheduleContext, overrides: dict[str, Any]) -> SamplingPlan:
    sampler = registries.samplers.get(sampler_name)
    chosen = registries.schedulers.get(str(scheduler_name).strip() or "automatic")
    scheduler = schedules.resolve_scheduler(sampler, chosen, registries.schedulers)
    sigmas = schedules.sigmas_for(sampler, scheduler, steps, context)
    if not torch.isfinite(sigmas).all():
        raise InvalidParams(f"schedule {scheduler.label!r} gave invalid sigmas for {steps} steps")
    options = sampler_options(sampler, overrides)
    if "model_sigmas" in inspect.signature(sampler.function).parameters:  # e.g. TCD's timestep mapping
        options["model_sigmas"] = context.model_sigmas
    if "flow" in inspect.signature(sampler.function).parameters:  # rectified-flow noise for FLUX.1 / SD3.5
        options["flow"] = context.flow
    elif context.flow and samplers_flow.adds_noise(sampler.uses_noise, options):  # VE noise: run it in VE form
        sampler = replace(sampler, function=samplers_flow.in_ve_form(sampler.function))
    if context.flow and sampler.vp_start:  # DDIM / PLMS start from flow noise like the others
        sampler = replace(sampler, vp_start=False)
    return SamplingPlan(sampler, scheduler, sigmas.to(context.device, torch.float32), options)


def img2img_steps(steps: int, denoising_strength: float) -> int:
    """A1111's `t_enc`: sampling runs over the last `t_enc + 1` steps of a `steps`-step schedule."""
    return int(min(denoising_strength, 0.999) * steps)


def starting_at(plan: SamplingPlan, t_enc: int) -> SamplingPlan:
    """The plan cut to its last `t_enc + 1` steps (A1111's `sigmas[steps - t_enc - 1:]`)."""
    if not 0 <= t_enc < len(plan.sigmas) - 1:
        raise InvalidParams(f"cannot start {t_enc + 1} steps before the end of a {len(plan.sigmas) - 1}-step schedule")
    return replace(plan, sigmas=plan.sigmas[-(t_enc + 2):])


def noise_sampler_for(plan: SamplingPlan, x: torch.Tensor, seeds: list[int], draw: Callable[[], torch.Tensor],
                      mode: str = "brownian") -> Callable[[Any, Any], torch.Tensor]:
    """The pass's noise: per-image Brownian trees over the plan's sigma range, seeded by the images'
    seeds as A1111 does, for samplers that ask for it (unless `mode` is "sequential"); otherwise
    fresh draws from the images' generators. The trees live on x's device, as A1111's."""
    if mode not in SDE_NOISE_MODES:
        raise InvalidParams(f"unknown SDE noise {mode!r}: use one of {', '.join(SDE_NOISE_MODES)}")
    positive = plan.sigmas[plan.sigmas > 0]
    if plan.sampler.brownian_noise and mode == "brownian" and len(positive) >= 2:
        return BrownianTreeNoise(x, float(positive.min()), float(plan.sigmas.max()), seeds)
    return SequentialNoise(draw)


def run_sampler(plan: SamplingPlan, denoiser: Denoiser, x: torch.Tensor,
                noise_sampler: Callable[[Any, Any], torch.Tensor] | None,
                on_step: Callable[[int, torch.Tensor], None],
                fallback: torch.Tensor | None = None) -> Sampled:
    """Sample; a StopSampling from the denoiser ends it early with `Sampled.stop` set.

    On a stop, the latest denoised prediction is returned, as A1111 does (before the
    first step: `fallback`, else `x`; img2img passes its init latents).
    """
    last: dict[str, torch.Tensor] = {}

    def callback(info: dict) -> None:
        last["denoised"] = info["denoised"]
        denoiser.set_step(info["i"] + 1)
        on_step(info["i"] + 1, info["denoised"])

    try:
        with torch.inference_mode():
            latents = plan.sampler.function(denoiser, x, plan.sigmas, extra_args={}, callback=callback,
                                            disable=True, noise_sampler=noise_sampler, **plan.options)
        return Sampled(latents)
    except StopSampling as stop:
        return Sampled(last.get("denoised", x if fallback is None else fallback), stop.reason)
