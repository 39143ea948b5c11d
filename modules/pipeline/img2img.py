"""img2img, inpainting and outpainting on the shared run loop (A1111's StableDiffusionProcessingImg2Img).

Sampling starts from `init_latent + noise * sigma` at step `steps - t_enc - 1` of the
full schedule, `t_enc = int(min(denoising_strength, 0.999) * steps)`. With a mask,
ordinary models keep the init latent outside it at every step and 9-channel
inpainting models also get the masked image as conditioning; the result is pasted
back over the original through the blurred mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from modules.pipeline import inpaint, masks
from modules.pipeline import latents as latent_ops
from modules.pipeline.control import JobControl, ProgressCallback
from modules.pipeline.generation import BatchSeeds, GenerationRun
from modules.pipeline.params import Img2ImgParams, Result
from modules.pipeline.sampling import img2img_steps, starting_at
from modules.sampling import rng


def _batched(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """One init image's tensor repeated for the whole batch."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    return tensor.expand(batch, *tensor.shape[1:])


class Img2ImgRun(GenerationRun):
    """One img2img / inpainting job on one loaded model."""

    task = "img2img"

    def __init__(self, engine, params: Img2ImgParams, control: JobControl | None,
                 on_progress: ProgressCallback | None) -> None:
        super().__init__(engine, params, control, on_progress)
        p = self.params
        self.extra_fields["Denoising strength"] = p.denoising_strength
        self.inputs = inpaint.prepare(p, self.result.warnings, self.extra_fields)
        t_enc = img2img_steps(p.steps, p.denoising_strength)
        self.plan = starting_at(self.plan, t_enc)
        self.steps_per_batch = t_enc + 1
        if p.initial_noise_multiplier != 1.0:
            self.extra_fields["Noise multiplier"] = p.initial_noise_multiplier
        self.init_latent = self.nmask = self.concat = None
        if not self.inputs.empty:
            self._encode_inputs()

    def _encode_inputs(self) -> None:
        p, model = self.params, self.model
        size = (p.height // 8, p.width // 8)
        init = self.encode(self.inputs.images)
        if init.shape[2:] != size:  # latent upscale (resize mode 3)
            init = F.interpolate(init, size=size, mode="bilinear")
        if self.inputs.mask is not None:
            self.nmask = masks.latent_mask(self.inputs.mask, *size).to(model.device)
            if p.inpainting_fill == 3:  # latent nothing
                init = init * (1.0 - self.nmask)
        self.init_latent = init
        if model.spec.is_inpaint:
            self.concat = self._inpaint_conditioning(size)

    def _inpaint_conditioning(self, size: tuple[int, int]) -> torch.Tensor:
        """9-channel models: the rounded mask and the masked image's latents (A1111, mask weight 1)."""
        p, model = self.params, self.model
        if self.inputs.mask is None:
            return self.inpaint_concat(len(self.inputs.images), p.height, p.width)
        mask = masks.conditioning_mask(self.inputs.mask)
        masked = latent_ops.from_pil(self.inputs.images) * (1.0 - mask)
        masked_latent = latent_ops.encode(model.vae, masked, model.spec.vae_scale_factor,
                                          self.engine.vae_tiling()).to(model.device)
        small = F.interpolate(mask, size=size).to(model.device)
        return torch.cat([small.expand(masked_latent.shape[0], -1, -1, -1), masked_latent], dim=1)

    def make_images(self, n: int, seeds: BatchSeeds, prompts: list[str], negatives: list[str]) -> list[Image.Image]:
        if self.inputs.empty:
            originals = self.inputs.originals
            return [originals[i if len(originals) > 1 else 0].copy() for i in range(self.params.batch_size)]
        return super().make_images(n, seeds, prompts, negatives)

    def sample_batch(self, n: int, seeds: BatchSeeds, prompts: list[str], negatives: list[str]) -> torch.Tensor:
        p = self.params
        conds, unconds = self.conditioner.for_batch(prompts, negatives, p.steps)
        init = _batched(self.init_latent, p.batch_size)
        nmask = self.nmask
        if nmask is not None and p.inpainting_fill == 2:  # latent noise: each image's first seeded noise
            fill = rng.ImageNoise(tuple(init.shape[1:]), seeds.seeds, source=p.rng_source,
                                  device=self.model.device).first()
            init = init * (1.0 - nmask) + fill * nmask
        noise = self.noise(seeds, init.shape[1:])
        x = init + noise.first() * p.initial_noise_multiplier * self.plan.sigmas[0]
        denoiser = self.denoiser(conds, unconds, p.height, p.width, _batched(self.concat, p.batch_size))
        if nmask is not None:
            denoiser = inpaint.MaskBlend(denoiser, init, nmask)
        samples = self.sample(n, self.plan, denoiser, x, noise, fallback=init)
        if nmask is not None:
            samples = samples * nmask + init * (1.0 - nmask)
        return samples

    def finish(self, image: Image.Image, index: int) -> Image.Image:
        if self.inputs.mask is None or self.inputs.empty:
            return image
        return inpaint.paste_back(self.inputs, image, index)


def img2img(engine, params: Img2ImgParams, control: JobControl | None = None,
            on_progress: ProgressCallback | None = None) -> Result:
    return Img2ImgRun(engine, params, control, on_progress).run()
