"""Hires fix: upscale txt2img's first-pass result, then an img2img pass at the larger size (A1111).

As a pass of the txt2img task: upscale -> conditioning (the hires prompts) -> sampling.

The second pass runs exactly `hr_second_pass_steps` (or `steps`) steps: as A1111's
`setup_img2img_steps` with explicit steps, the schedule is built for
`int(steps / min(denoise, 0.999))` steps and sampling covers its last `steps`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modules.pipeline.hooks import CONDITIONING, SAMPLING, UPSCALE
from modules.pipeline.job import Batch, Job, add_noise, encode, inpaint_concat, make_plan, noise
from modules.pipeline.params import Txt2ImgParams, hires_target
from modules.pipeline.resize import LANCZOS
from modules.pipeline.sampling import Sampled, SamplingPlan, starting_at
from modules.pipeline.stages import SamplingInput, condition, decode, run_stage, sample


@dataclass(frozen=True)
class HiresPlan:
    """The second pass of one txt2img job: target size, upscaler and plan (None: strength 0, no sampling)."""

    upscaler: Any  # UpscalerSpec
    width: int
    height: int
    truncate_x: int
    truncate_y: int
    steps: int
    plan: SamplingPlan | None

    @property
    def sampling_steps(self) -> int:
        return self.steps if self.plan is not None else 0


def hires_plan(job: Job) -> HiresPlan:
    p: Txt2ImgParams = job.params
    upscaler = job.engine.registries.upscalers.get(p.hr_upscaler)
    width, height, truncate_x, truncate_y = hires_target(p, job.engine.settings.limits.max_size)
    steps = p.hr_second_pass_steps or p.steps
    plan = None
    if p.denoising_strength > 0:
        total = int(steps / min(p.denoising_strength, 0.999))
        full = make_plan(job, p.hr_sampler_name or p.sampler_name, p.hr_scheduler or p.scheduler, total)
        plan = starting_at(full, steps - 1)
    return HiresPlan(upscaler, width, height, truncate_x, truncate_y, steps, plan)


def infotext_fields(p: Txt2ImgParams, first: SamplingPlan, hires: HiresPlan) -> dict[str, Any]:
    """A1111's Hires keys, in its order ("Denoising strength" is a leading key of its own)."""
    fields: dict[str, Any] = {}
    if hires.plan is not None and hires.plan.sampler.name != first.sampler.name:
        fields["Hires sampler"] = hires.plan.sampler.name
    if p.hr_prompt and p.hr_prompt != p.prompt:
        fields["Hires prompt"] = p.hr_prompt
    if p.hr_negative_prompt and p.hr_negative_prompt != p.negative_prompt:
        fields["Hires negative prompt"] = p.hr_negative_prompt
    if hires.plan is not None and p.hr_scheduler and hires.plan.scheduler.label != first.scheduler.label:
        fields["Hires schedule type"] = hires.plan.scheduler.label
    if p.hr_resize_x == 0 and p.hr_resize_y == 0:
        fields["Hires upscale"] = p.hr_scale
    else:
        fields["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
    if p.hr_second_pass_steps:
        fields["Hires steps"] = p.hr_second_pass_steps
    fields["Hires upscaler"] = hires.upscaler.name
    return fields


def upscale(job: Job, hires: HiresPlan, samples: torch.Tensor) -> Sampled:
    """First-pass latents -> latents at the hires size (truncated as A1111); a pixel upscaler decodes."""
    size = (hires.height // 8, hires.width // 8)
    warnings: tuple[str, ...] = ()
    if hires.upscaler.is_latent:
        latents = F.interpolate(samples.float(), size=size, mode=hires.upscaler.latent_mode,
                                antialias=hires.upscaler.antialias)
    else:
        decoded = decode(job, samples)
        warnings = decoded.warnings
        latents = encode(job, [_upscale_image(hires.upscaler, image, size) for image in decoded.images])
    ty, tx = hires.truncate_y, hires.truncate_x
    latents = latents[:, :, ty // 2 : latents.shape[2] - (ty + 1) // 2, tx // 2 : latents.shape[3] - (tx + 1) // 2]
    return Sampled(latents.to(job.model.device), warnings=warnings)


def _upscale_image(upscaler: Any, image, size: tuple[int, int]):
    """A1111's resize with an upscaler: upscale by the covering scale, then Lanczos to the exact size."""
    width, height = size[1] * 8, size[0] * 8  # whole latents, so both paths give the same shape
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscaler.function(image, scale)
    return image if image.size == (width, height) else image.resize((width, height), resample=LANCZOS)


def hires_pass(job: Job, inputs: Any, batch: Batch, first: Sampled | None) -> Sampled:
    """The second pass over one batch's first-pass latents; without `enable_hr`, `first` as it is."""
    hires: HiresPlan | None = inputs.hires
    if hires is None or first is None:
        return first
    upscaled = run_stage(job, UPSCALE, upscale, job, hires, first.latents)
    warnings = first.warnings + upscaled.warnings
    if hires.plan is None:
        return Sampled(upscaled.latents, warnings=warnings)
    p, latents = job.params, upscaled.latents
    image_noise = noise(job, batch, latents.shape[1:])
    x = add_noise(job, latents, image_noise.first().to(latents.device), hires.plan.sigmas[0])
    cond = run_stage(job, CONDITIONING, condition, job, [p.hr_prompt or prompt for prompt in batch.prompts],
                     [p.hr_negative_prompt or negative for negative in batch.negatives], hires.steps)
    concat = inpaint_concat(job, latents.shape[0], latents.shape[2] * 8, latents.shape[3] * 8)
    s = SamplingInput("hires", hires.plan, cond, x, image_noise, hires.width, hires.height, concat,
                      fallback=latents, step_offset=len(inputs.plan.sigmas) - 1,
                      steps_per_batch=inputs.steps_per_batch)
    sampled = run_stage(job, SAMPLING, sample, job, batch, s)
    return Sampled(sampled.latents, sampled.stop, warnings + sampled.warnings)
