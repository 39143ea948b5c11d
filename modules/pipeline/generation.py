"""The run loop every task shares: plan, conditioning, noise, denoiser, sampling, decode, infotext, save.

`GenerationRun` drives a job batch by batch; a task (txt2img, img2img, the hires pass)
only says how a batch's latents are made (`sample_batch`) and, optionally, how the
decoded images are finished (`finish`, e.g. inpainting's paste-back).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from modules import images as image_files
from modules import infotext
from modules.pipeline import latents as latent_ops
from modules.pipeline.conditioning import PromptConditioner
from modules.pipeline.control import JobControl, Progress, ProgressCallback
from modules.pipeline.params import GenerationParams, Result
from modules.pipeline.sampling import SamplingPlan, plan_sampling, run_sampler
from modules.plugins.specs import ScheduleContext
from modules.sampling import rng
from modules.sampling.denoisers import CFGDenoiser, ModelDenoiser

VERSION = "atelier-0.1.0"
SAMPLER_OPTION_FIELDS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")


@dataclass(frozen=True)
class BatchSeeds:
    seeds: list[int]
    subseeds: list[int]


def schedule_context(engine, model, params: GenerationParams) -> ScheduleContext:
    table = engine.discrete_schedule(model)
    return ScheduleContext(
        sigma_min=params.sigma_min or float(table.sigma_min),
        sigma_max=params.sigma_max or float(table.sigma_max),
        model_sigmas=table.sigmas, rho=params.rho, arch=model.spec.arch, device=model.device)


def base_infotext_fields(params: GenerationParams, plan: SamplingPlan, model, seed: int, subseed: int) -> dict:
    """A1111's infotext keys for one image (the infotext module orders them)."""
    varied = params.subseed_strength > 0
    resized = params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0
    return {
        "Steps": params.steps,
        "Sampler": plan.sampler.name,
        "Schedule type": plan.scheduler.label,
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": model.model_hash or None,
        "Model": model.info.stem,
        "VAE hash": model.vae_hash,
        "VAE": model.vae_name,
        "Variation seed": subseed if varied else None,
        "Variation seed strength": params.subseed_strength if varied else None,
        "Seed resize from": f"{params.seed_resize_from_w}x{params.seed_resize_from_h}" if resized else None,
        "Conditional mask weight": 1.0 if model.spec.is_inpaint else None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "ENSD": params.eta_noise_seed_delta or None,
        "RNG": params.rng_source.upper() if params.rng_source != "gpu" else None,
        "Emphasis": params.emphasis if params.emphasis != "Original" else None,
        "Version": VERSION,
    }


class GenerationRun:
    """One job on the loaded model. Subclasses implement `sample_batch`."""

    task = "txt2img"  # names the output folder: outputs/<task>-images

    def __init__(self, engine, params: GenerationParams, control: JobControl | None,
                 on_progress: ProgressCallback | None) -> None:
        params.validate(engine.settings.limits)
        self.engine = engine
        self.hooks = engine.job_hooks(self.task)  # extensions: prepare_params, guidance, post-processing
        params = self.hooks.prepare(params)  # random seeds are resolved here, before the hooks
        self.params = params
        self.model = engine.require_model()
        self.control = control or JobControl()
        self.on_progress = on_progress
        self.plan = self.make_plan(params.sampler_name, params.scheduler, params.steps)
        self.conditioner = PromptConditioner(engine.text_conditioner(self.model), params.clip_skip,
                                             params.emphasis, zero_empty_negative=self.model.spec.is_sdxl,
                                             embeddings=self.hooks.embeddings(self.model, engine.tokenizer(), params))
        self.result = Result()
        self.samples: list[torch.Tensor] = []  # each batch's final latents
        self.extra_fields: dict[str, Any] = {}  # A1111's extra_generation_params, in insertion order
        self.steps_per_batch = params.steps  # for progress: every pass of a batch together
        self.step_offset = 0  # steps of earlier passes of this batch
        self.stopped = False  # the last sampling pass was interrupted or skipped

    # -- the loop ---------------------------------------------------------------
    def run(self) -> Result:
        p = self.params
        seeds, subseeds = rng.batch_seeds(rng.resolve_seed(p.seed), rng.resolve_seed(p.subseed),
                                          p.subseed_strength, p.n_iter * p.batch_size)
        with self.hooks.patch(self.model, p).applied():  # LoRA etc.: copy-on-write, reverted on exit
            for n in range(p.n_iter):
                if self.control.interrupted:
                    break
                part = slice(n * p.batch_size, (n + 1) * p.batch_size)
                self._run_batch(n, BatchSeeds(seeds[part], subseeds[part]))
                self.control.clear_skip()
        self.result.interrupted = self.control.interrupted
        self.result.warnings.extend(self.hooks.warnings)
        return self.result

    def _run_batch(self, n: int, seeds: BatchSeeds) -> None:
        p = self.params
        prompts, negatives = [p.prompt] * p.batch_size, [p.negative_prompt] * p.batch_size
        self.step_offset = 0
        self._collect(self.make_images(n, seeds, prompts, negatives), seeds, prompts, negatives)

    def make_images(self, n: int, seeds: BatchSeeds, prompts: list[str], negatives: list[str]) -> list[Image.Image]:
        """Sample and decode one batch."""
        latents = self.sample_batch(n, seeds, prompts, negatives)
        self.samples.append(latents)
        return self.decode(latents)

    def sample_batch(self, n: int, seeds: BatchSeeds, prompts: list[str], negatives: list[str]) -> torch.Tensor:
        """The batch's final latents."""
        raise NotImplementedError

    def finish(self, image: Image.Image, index: int) -> Image.Image:
        """The last step for image `index` of a batch, after post-processing (inpainting pastes back)."""
        return image

    # -- building blocks ----------------------------------------------------------
    def make_plan(self, sampler_name: str, scheduler: str, steps: int) -> SamplingPlan:
        overrides = {k: getattr(self.params, k) for k in SAMPLER_OPTION_FIELDS}
        return plan_sampling(self.engine.registries, sampler_name, scheduler, steps,
                             schedule_context(self.engine, self.model, self.params), overrides)

    def noise(self, seeds: BatchSeeds, shape: Sequence[int]) -> rng.ImageNoise:
        """Each image's seeded noise stream (variation seed, resize-seed-from and ENSD applied)."""
        p = self.params
        resize_from = None
        if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
            resize_from = (p.seed_resize_from_h // 8, p.seed_resize_from_w // 8)
        return rng.ImageNoise(tuple(shape), seeds.seeds, seeds.subseeds, p.subseed_strength,
                              resize_from=resize_from, source=p.rng_source, device=self.model.device,
                              eta_noise_seed_delta=p.eta_noise_seed_delta)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.model.unet.config.out_channels, height // 8, width // 8)

    def denoiser(self, conds, unconds, height: int, width: int, concat: torch.Tensor | None = None) -> CFGDenoiser:
        """CFG over the model for images of `height` x `width` (SDXL's size conditioning)."""
        model = self.model
        time_ids = None
        if model.spec.is_sdxl:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        inner = ModelDenoiser(model.unet, self.engine.discrete_schedule(model).sigma_to_t,
                              model.spec.prediction, time_ids=time_ids)
        return CFGDenoiser(inner, conds, unconds, self.params.cfg_scale, self.control, concat,
                           on_guided=self.hooks.on_guided)

    def inpaint_concat(self, batch: int, height: int, width: int) -> torch.Tensor | None:
        """9-channel inpainting models without a mask: a full mask over a grey image (A1111)."""
        if not self.model.spec.is_inpaint:
            return None
        return latent_ops.txt2img_inpaint_concat(self.model.vae, batch, height, width,
                                                 self.model.spec.vae_scale_factor).to(self.model.device)

    def sample(self, n: int, plan: SamplingPlan, denoiser, x: torch.Tensor, noise: rng.ImageNoise,
               fallback: torch.Tensor | None = None) -> torch.Tensor:
        """Run one sampling pass; progress counts on from `step_offset`."""
        device = self.model.device
        offset = self.step_offset
        latents, self.stopped = run_sampler(
            plan, denoiser, x.to(device), lambda *_: noise.next().to(device),
            lambda step, denoised: self._report(n, offset + step, denoised), fallback)
        self.step_offset = offset + len(plan.sigmas) - 1
        return latents

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> scaled latents on the model's device."""
        pixels = latent_ops.from_pil(images)
        return latent_ops.encode(self.model.vae, pixels, self.model.spec.vae_scale_factor,
                                 self.engine.vae_tiling()).to(self.model.device)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        decoded, fell_back = latent_ops.decode(self.model.vae, latents, self.model.spec.vae_scale_factor,
                                               self.engine.vae_tiling())
        if fell_back:
            self.result.warnings.append("NaNs in the VAE output: the VAE now runs in fp32")
        return latent_ops.to_pil(decoded)

    # -- reporting and results ------------------------------------------------------
    def infotext_fields(self, seed: int, subseed: int) -> dict[str, Any]:
        fields = base_infotext_fields(self.params, self.plan, self.model, seed, subseed)
        version = fields.pop("Version")
        return {**fields, **self.extra_fields, **self.hooks.infotext(), "Version": version}

    def _report(self, n: int, step: int, denoised: torch.Tensor) -> None:
        if self.on_progress is None:
            return
        every = max(self.engine.settings.preview_every, 1)
        preview = None
        if step % every == 0 or step == self.steps_per_batch:
            preview = latent_ops.cheap_preview(denoised[0], self.model.spec.is_sdxl)
        self.on_progress(Progress(n, self.params.n_iter, step, self.steps_per_batch, preview))

    def outdir(self):
        return self.params.outdir or self.engine.settings.outputs_dir / f"{self.task}-images"

    def _collect(self, pil_images, seeds: BatchSeeds, prompts, negatives) -> None:
        p = self.params
        for i, image in enumerate(pil_images):
            image = self.hooks.postprocess(image, p, len(self.result.images), seeds.seeds[i], seeds.subseeds[i])
            image = self.finish(image, i)
            text = infotext.build(prompts[i], negatives[i], self.infotext_fields(seeds.seeds[i], seeds.subseeds[i]))
            image.info["parameters"] = text
            self.result.images.append(image)
            self.result.infotexts.append(text)
            self.result.seeds.append(seeds.seeds[i])
            self.result.subseeds.append(seeds.subseeds[i])
            self.result.prompts.append(prompts[i])
            self.result.negative_prompts.append(negatives[i])
            if p.save_images:
                self.result.paths.append(image_files.save_image(image, self.outdir(), seeds.seeds[i], text))
                self.hooks.saved(self.result.paths[-1], p, text)
