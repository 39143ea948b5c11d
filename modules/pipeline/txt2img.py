"""txt2img as a task: its inputs stage (plan, hires plan) and its first pass from seeded noise.

The hires fix is a second pass (hires.py) composed after the first one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from modules.pipeline import hires
from modules.pipeline.generation import Task
from modules.pipeline.hooks import CONDITIONING, SAMPLING
from modules.pipeline.job import Batch, Job, inpaint_concat, latent_shape, make_plan, noise
from modules.pipeline.sampling import Sampled, SamplingPlan
from modules.pipeline.stages import InfotextFields, SamplingInput, condition, run_stage, sample


def initial_noise_scale(plan: SamplingPlan) -> torch.Tensor:
    """txt2img starts from noise * sigma_max; DDIM from unit noise in VP space, as A1111 and diffusers."""
    sigma = plan.sigmas[0]
    return (sigma**2 + 1.0) ** 0.5 if plan.sampler.vp_start else sigma


@dataclass(frozen=True)
class Txt2ImgInputs:
    """txt2img's inputs stage: the first pass's plan and, with `enable_hr`, the hires pass's."""

    plan: SamplingPlan
    hires: hires.HiresPlan | None
    steps_per_batch: int
    infotext: InfotextFields
    warnings: tuple[str, ...] = ()
    passthrough: tuple[Image.Image, ...] | None = None


def txt2img_inputs(job: Job) -> Txt2ImgInputs:
    p = job.params
    plan = make_plan(job, p.sampler_name, p.scheduler, p.steps)
    if not p.enable_hr:
        return Txt2ImgInputs(plan, None, p.steps, InfotextFields())
    second = hires.hires_plan(job)
    fields = InfotextFields(hires.infotext_fields(p, plan, second), {"Denoising strength": p.denoising_strength})
    return Txt2ImgInputs(plan, second, p.steps + second.sampling_steps, fields)


def first_pass(job: Job, inputs: Txt2ImgInputs, batch: Batch, previous: Sampled | None) -> Sampled:
    """Seeded noise * sigma_max, sampled at the job's size."""
    p = job.params
    cond = run_stage(job, CONDITIONING, condition, job, batch.prompts, batch.negatives)
    image_noise = noise(job, batch, latent_shape(job, p.height, p.width))
    x = image_noise.first() * initial_noise_scale(inputs.plan)
    s = SamplingInput("first", inputs.plan, cond, x, image_noise, p.width, p.height,
                      concat=inpaint_concat(job, p.batch_size, p.height, p.width),
                      steps_per_batch=inputs.steps_per_batch)
    return run_stage(job, SAMPLING, sample, job, batch, s)


TXT2IMG = Task("txt2img", txt2img_inputs, (first_pass, hires.hires_pass))
