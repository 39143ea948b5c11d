"""img2img, inpainting and outpainting on the shared run loop (A1111's StableDiffusionProcessingImg2Img).

Sampling starts from `init_latent + noise * sigma` at step `steps - t_enc - 1` of the
full schedule, `t_enc = int(min(denoising_strength, 0.999) * steps)`. With a mask,
ordinary models keep the init latent outside it at every step and 9-channel
inpainting models also get the masked image as conditioning; the result is pasted
back over the original through the blurred mask.

As a task: the inputs stage prepares and encodes the init images and mask once per job;
the one pass is conditioning -> sampling; `finish` pastes back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from modules.pipeline import inpaint, masks
from modules.pipeline import latents as latent_ops
from modules.pipeline.generation import Task
from modules.pipeline.hooks import CONDITIONING, SAMPLING
from modules.pipeline.job import Batch, Job, add_noise, encode, inpaint_concat, make_plan, noise
from modules.pipeline.sampling import Sampled, SamplingPlan, img2img_steps, starting_at
from modules.pipeline.stages import InfotextFields, SamplingInput, condition, run_stage, sample
from modules.sampling import rng


def _batched(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """One init image's tensor repeated for the whole batch."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    return tensor.expand(batch, *tensor.shape[1:])


@dataclass(frozen=True)
class Encoded:
    """The init images as latents: `nmask` (1 where to repaint) and 9-channel conditioning when they apply."""

    init_latent: torch.Tensor | None = None
    nmask: torch.Tensor | None = None
    concat: torch.Tensor | None = None


@dataclass(frozen=True)
class Img2ImgInputs:
    """img2img's inputs stage: the cut plan, the prepared images and mask, and their latents."""

    plan: SamplingPlan
    steps_per_batch: int
    infotext: InfotextFields
    warnings: tuple[str, ...]
    images: inpaint.Inputs
    encoded: Encoded
    passthrough: tuple[Image.Image, ...] | None = None  # an empty mask: the originals, unchanged

    @property
    def init_latent(self) -> torch.Tensor | None:
        return self.encoded.init_latent

    @property
    def concat(self) -> torch.Tensor | None:
        return self.encoded.concat


def img2img_inputs(job: Job) -> Img2ImgInputs:
    p = job.params
    plan = make_plan(job, p.sampler_name, p.scheduler, p.steps)
    fields: dict[str, Any] = {"Denoising strength": p.denoising_strength}
    warnings: list[str] = []
    images = inpaint.prepare(p, warnings, fields)
    t_enc = img2img_steps(p.steps, p.denoising_strength)
    if p.initial_noise_multiplier != 1.0:
        fields["Noise multiplier"] = p.initial_noise_multiplier
    encoded = Encoded() if images.empty else encode_inputs(job, images)
    return Img2ImgInputs(starting_at(plan, t_enc), t_enc + 1, InfotextFields(fields), tuple(warnings), images,
                         encoded, tuple(images.originals) if images.empty else None)


def encode_inputs(job: Job, images: inpaint.Inputs) -> Encoded:
    p, model = job.params, job.model
    size = (p.height // 8, p.width // 8)
    init = encode(job, images.images)
    if init.shape[2:] != size:  # latent upscale (resize mode 3)
        init = F.interpolate(init, size=size, mode="bilinear")
    nmask = None
    if images.mask is not None:
        nmask = masks.latent_mask(images.mask, *size).to(model.device)
        if p.inpainting_fill == 3:  # latent nothing
            init = init * (1.0 - nmask)
    concat = inpaint_conditioning(job, images, size) if model.spec.is_inpaint else None
    return Encoded(init, nmask, concat)


def inpaint_conditioning(job: Job, images: inpaint.Inputs, size: tuple[int, int]) -> torch.Tensor:
    """9-channel models: the rounded mask and the masked image's latents (A1111, mask weight 1)."""
    p, model = job.params, job.model
    if images.mask is None:
        return inpaint_concat(job, len(images.images), p.height, p.width)
    mask = masks.conditioning_mask(images.mask)
    masked_latent = encode_pixels(job, latent_ops.from_pil(images.images) * (1.0 - mask))
    small = F.interpolate(mask, size=size).to(model.device)
    return torch.cat([small.expand(masked_latent.shape[0], -1, -1, -1), masked_latent], dim=1)


def encode_pixels(job: Job, pixels: torch.Tensor) -> torch.Tensor:
    model = job.model
    return latent_ops.encode(model.vae, pixels, model.spec.vae_scale_factor,
                             job.engine.vae_tiling(), shift=latent_ops.latent_shift(model)).to(model.device)


def img2img_pass(job: Job, inputs: Img2ImgInputs, batch: Batch, previous: Sampled | None) -> Sampled:
    """init + noise * sigma at the cut plan's start; with a mask, the init is kept outside it."""
    p, nmask = job.params, inputs.encoded.nmask
    cond = run_stage(job, CONDITIONING, condition, job, batch.prompts, batch.negatives)
    init = _batched(inputs.init_latent, p.batch_size)
    if nmask is not None and p.inpainting_fill == 2:  # latent noise: each image's first seeded noise
        fill = rng.ImageNoise(tuple(init.shape[1:]), list(batch.seeds), source=p.rng_source,
                              device=job.model.device).first()
        init = init * (1.0 - nmask) + fill * nmask
    image_noise = noise(job, batch, init.shape[1:])
    x = add_noise(job, init, image_noise.first() * p.initial_noise_multiplier, inputs.plan.sigmas[0])
    blend = None if nmask is None else (lambda denoiser: inpaint.MaskBlend(denoiser, init, nmask))
    s = SamplingInput("first", inputs.plan, cond, x, image_noise, p.width, p.height,
                      _batched(inputs.concat, p.batch_size), fallback=init,
                      steps_per_batch=inputs.steps_per_batch, blend=blend,
                      init_images=tuple(inputs.images.images), mask=inputs.images.mask)
    sampled = run_stage(job, SAMPLING, sample, job, batch, s)
    if nmask is None:
        return sampled
    return Sampled(sampled.latents * nmask + init * (1.0 - nmask), sampled.stop, sampled.warnings)


def paste_back(inputs: Img2ImgInputs, image: Image.Image, index: int) -> Image.Image:
    if inputs.images.mask is None or inputs.images.empty:
        return image
    return inpaint.paste_back(inputs.images, image, index)


IMG2IMG = Task("img2img", img2img_inputs, (img2img_pass,), paste_back)
