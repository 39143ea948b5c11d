"""txt2img: noise -> sampling (-> hires fix) -> decode -> saved images, on the shared run loop."""
from __future__ import annotations

from typing import Any

import torch

from modules.pipeline.control import JobControl, ProgressCallback
from modules.pipeline.generation import BatchSeeds, GenerationRun
from modules.pipeline.hires import HiresPass
from modules.pipeline.params import Result, Txt2ImgParams
from modules.pipeline.sampling import SamplingPlan


def initial_noise_scale(plan: SamplingPlan) -> torch.Tensor:
    """txt2img starts from noise * sigma_max; DDIM from unit noise in VP space, as A1111 and diffusers."""
    sigma = plan.sigmas[0]
    return (sigma**2 + 1.0) ** 0.5 if plan.sampler.vp_start else sigma


class Txt2ImgRun(GenerationRun):
    """One txt2img job on one loaded model, with A1111's hires fix when `enable_hr` is set."""

    task = "txt2img"

    def __init__(self, engine, params: Txt2ImgParams, control: JobControl | None,
                 on_progress: ProgressCallback | None) -> None:
        super().__init__(engine, params, control, on_progress)
        self.hires = HiresPass(self) if params.enable_hr else None
        if self.hires is not None:
            self.steps_per_batch += self.hires.sampling_steps
            self.extra_fields.update(self.hires.infotext_fields())

    def infotext_fields(self, seed: int, subseed: int) -> dict[str, Any]:
        fields = super().infotext_fields(seed, subseed)
        if self.hires is not None:
            fields["Denoising strength"] = self.params.denoising_strength
        return fields

    def sample_batch(self, n: int, seeds: BatchSeeds, prompts: list[str], negatives: list[str]) -> torch.Tensor:
        p = self.params
        conds, unconds = self.conditioner.for_batch(prompts, negatives, p.steps)
        noise = self.noise(seeds, self.latent_shape(p.height, p.width))
        x = noise.first() * initial_noise_scale(self.plan)
        concat = self.inpaint_concat(p.batch_size, p.height, p.width)
        denoiser = self.denoiser(conds, unconds, p.height, p.width, concat)
        samples = self.sample(n, self.plan, denoiser, x, noise)
        if self.hires is None or self.stopped:
            return samples  # an interrupted or skipped first pass is not upscaled
        return self.hires.sample(n, samples, seeds, prompts, negatives)


def txt2img(engine, params: Txt2ImgParams, control: JobControl | None = None,
            on_progress: ProgressCallback | None = None) -> Result:
    return Txt2ImgRun(engine, params, control, on_progress).run()
