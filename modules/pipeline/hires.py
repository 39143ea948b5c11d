"""Hires fix: upscale txt2img's first-pass result, then an img2img pass at the larger size (A1111).

The second pass runs exactly `hr_second_pass_steps` (or `steps`) steps: as A1111's
`setup_img2img_steps` with explicit steps, the schedule is built for
`int(steps / min(denoise, 0.999))` steps and sampling covers its last `steps`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from modules.errors import InvalidParams
from modules.pipeline.params import MIN_SIZE, Txt2ImgParams
from modules.pipeline.resize import LANCZOS
from modules.pipeline.sampling import SamplingPlan, starting_at
from modules.settings import DEFAULT_LIMITS


def hires_target(p: Txt2ImgParams, max_size: int = DEFAULT_LIMITS.max_size) -> tuple[int, int, int, int]:
    """(width, height, truncate_x, truncate_y) of the hires pass, as A1111 computes them.

    With both `hr_resize_x` and `hr_resize_y`, the image is upscaled to cover that size
    keeping its aspect ratio and the excess latent columns/rows are cut (truncate_*).
    """
    rx, ry = p.hr_resize_x, p.hr_resize_y
    truncate_x = truncate_y = 0
    if rx == 0 and ry == 0:
        width, height = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
    elif ry == 0:
        width, height = rx, rx * p.height // p.width
    elif rx == 0:
        width, height = ry * p.width // p.height, ry
    else:
        if p.width / p.height < rx / ry:
            width, height = rx, rx * p.height // p.width
        else:
            width, height = ry * p.width // p.height, ry
        truncate_x, truncate_y = (width - rx) // 8, (height - ry) // 8
    if min(width, height) < MIN_SIZE or max(width, height) > max_size:
        raise InvalidParams(f"the hires fix would make a {width}x{height} image; "
                            f"sizes must lie between {MIN_SIZE} and {max_size}")
    return width, height, truncate_x, truncate_y


class HiresPass:
    """The second pass of one txt2img job; `run` is its `Txt2ImgRun`."""

    def __init__(self, run) -> None:
        p: Txt2ImgParams = run.params
        self.run = run
        self.upscaler = run.engine.registries.upscalers.get(p.hr_upscaler)
        self.width, self.height, self.truncate_x, self.truncate_y = hires_target(p, run.engine.settings.limits.max_size)
        self.steps = p.hr_second_pass_steps or p.steps
        self.plan: SamplingPlan | None = None  # None: denoising strength 0, no second sampling
        if p.denoising_strength > 0:
            total = int(self.steps / min(p.denoising_strength, 0.999))
            plan = run.make_plan(p.hr_sampler_name or p.sampler_name, p.hr_scheduler or p.scheduler, total)
            self.plan = starting_at(plan, self.steps - 1)

    @property
    def sampling_steps(self) -> int:
        return self.steps if self.plan is not None else 0

    def infotext_fields(self) -> dict[str, Any]:
        """A1111's Hires keys, in its order ("Denoising strength" is a leading key of its own)."""
        p, first = self.run.params, self.run.plan
        fields: dict[str, Any] = {}
        if self.plan is not None and self.plan.sampler.name != first.sampler.name:
            fields["Hires sampler"] = self.plan.sampler.name
        if p.hr_prompt and p.hr_prompt != p.prompt:
            fields["Hires prompt"] = p.hr_prompt
        if p.hr_negative_prompt and p.hr_negative_prompt != p.negative_prompt:
            fields["Hires negative prompt"] = p.hr_negative_prompt
        if self.plan is not None and p.hr_scheduler and self.plan.scheduler.label != first.scheduler.label:
            fields["Hires schedule type"] = self.plan.scheduler.label
        if p.hr_resize_x == 0 and p.hr_resize_y == 0:
            fields["Hires upscale"] = p.hr_scale
        else:
            fields["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
        if p.hr_second_pass_steps:
            fields["Hires steps"] = p.hr_second_pass_steps
        fields["Hires upscaler"] = self.upscaler.name
        return fields

    def upscale(self, samples: torch.Tensor) -> torch.Tensor:
        """First-pass latents -> latents at the hires size (truncated as A1111)."""
        size = (self.height // 8, self.width // 8)
        if self.upscaler.is_latent:
            latents = F.interpolate(samples.float(), size=size, mode=self.upscaler.latent_mode,
                                    antialias=self.upscaler.antialias)
        else:
            latents = self.run.encode([self._upscale_image(image, size) for image in self.run.decode(samples)])
        ty, tx = self.truncate_y, self.truncate_x
        return latents[:, :, ty // 2 : latents.shape[2] - (ty + 1) // 2, tx // 2 : latents.shape[3] - (tx + 1) // 2]

    def _upscale_image(self, image, size: tuple[int, int]):
        """A1111's resize with an upscaler: upscale by the covering scale, then Lanczos to the exact size."""
        width, height = size[1] * 8, size[0] * 8  # whole latents, so both paths give the same shape
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = self.upscaler.function(image, scale)
        return image if image.size == (width, height) else image.resize((width, height), resample=LANCZOS)

    def sample(self, n: int, samples: torch.Tensor, seeds, prompts: list[str], negatives: list[str]) -> torch.Tensor:
        """The second pass over one batch's first-pass latents."""
        run, p = self.run, self.run.params
        latents = self.upscale(samples).to(run.model.device)
        if self.plan is None:
            return latents
        noise = run.noise(seeds, latents.shape[1:])
        x = latents + noise.first().to(latents.device) * self.plan.sigmas[0]
        hr_prompts = [p.hr_prompt or prompt for prompt in prompts]
        hr_negatives = [p.hr_negative_prompt or negative for negative in negatives]
        conds, unconds = run.conditioner.for_batch(hr_prompts, hr_negatives, p.steps, hires_steps=self.steps)
        height, width = latents.shape[2] * 8, latents.shape[3] * 8
        concat = run.inpaint_concat(latents.shape[0], height, width)
        denoiser = run.denoiser(conds, unconds, self.height, self.width, concat)
        return run.sample(n, self.plan, denoiser, x, noise, fallback=latents)
