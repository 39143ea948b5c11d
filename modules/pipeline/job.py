"""One prepared job (`Job`) and the per-job building blocks stages share: plans, noise, VAE encode.

A `Job` is built once, after the hooks' `prepare`, and never changes; stages take it
with their own typed inputs and return new values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from modules.checkpoints import families
from modules.pipeline import latents as latent_ops
from modules.pipeline.conditioning import PromptConditioner
from modules.pipeline.control import JobControl, ProgressCallback
from modules.pipeline.hooks import StageHooks
from modules.pipeline.params import GenerationParams
from modules.pipeline.refiner import Refiner
from modules.pipeline.sampling import SAMPLER_OPTION_FIELDS, SamplerRegistries, SamplingPlan, plan_sampling
from modules.sampling import flow, rng
from modules.sampling.schedules import DiscreteSchedule
from modules.sampling.specs import ScheduleContext


class Engine(Protocol):
    """What stages use of the engine (modules.pipeline.engine.Engine), without importing it."""

    settings: Any  # modules.settings.Settings
    registries: SamplerRegistries

    def require_model(self) -> Any: ...

    def tokenizer(self) -> Any: ...

    def text_conditioner(self, model: Any) -> Any: ...

    def discrete_schedule(self, model: Any) -> Any: ...

    def vae_tiling(self) -> Any: ...

    def refiner_model(self, params: Any, base: Any) -> Any: ...


@dataclass(frozen=True)
class Job:
    """A job ready to run: prepared params, the loaded model, its hooks, control and conditioner."""

    engine: Engine  # settings, registries and per-model helpers (schedule, text encoder, VAE tiling)
    task: str  # "txt2img" or "img2img": names the hooks' task and the output folder
    params: GenerationParams
    model: Any  # LoadedModel
    hooks: StageHooks
    control: JobControl
    on_progress: ProgressCallback | None
    conditioner: PromptConditioner
    refiner: Any = None  # a modules.pipeline.refiner.Refiner, or None


@dataclass(frozen=True)
class Batch:
    """One batch of a job: its index in n_iter, each image's seeds and prompts."""

    index: int
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]


def new_job(engine: Engine, task: str, params: GenerationParams, hooks: StageHooks,
            control: JobControl | None = None, on_progress: ProgressCallback | None = None) -> Job:
    """Run the hooks' `prepare` (random seeds resolved there) and bind the job to the loaded model."""
    params = hooks.prepare(params)
    model = engine.require_model()
    params = with_family_defaults(params, model.spec.family)
    conditioner = PromptConditioner(engine.text_conditioner(model), params.clip_skip, params.emphasis,
                                    zero_empty_negative=model.spec.is_sdxl,  # not FLUX / SD3 (as diffusers)
                                    embeddings=hooks.embeddings(model, engine.tokenizer(), params))
    return Job(engine, task, params, model, hooks, control or JobControl(), on_progress, conditioner,
               _refiner(engine, params, model, hooks, conditioner))


def _refiner(engine: Engine, params: GenerationParams, model: Any, hooks: StageHooks,
             base_conditioner: PromptConditioner) -> Refiner | None:
    """The job's refiner (loaded by the engine, checked against the base model), or None."""
    refiner_model = engine.refiner_model(params, model)
    if refiner_model is None:
        return None
    if refiner_model is model:
        return Refiner(model, base_conditioner, float(params.refiner_switch_at))
    conditioner = PromptConditioner(engine.text_conditioner(refiner_model), params.clip_skip, params.emphasis,
                                    zero_empty_negative=refiner_model.spec.is_sdxl,
                                    embeddings=hooks.embeddings(refiner_model, engine.tokenizer(), params))
    return Refiner(refiner_model, conditioner, float(params.refiner_switch_at))


def with_family_defaults(params: GenerationParams, family: Any) -> GenerationParams:
    """The params with `params.model_defaults` fields set to a flow family's defaults (Forge's presets)."""
    wanted = families.defaults(family)
    changes = {name: wanted[name] for name in params.model_defaults if name in wanted}
    return replace(params, **changes) if changes else params


def batches(job: Job) -> list[Batch]:
    """The job's batches with A1111's seeds (variation seeds included)."""
    p = job.params
    seeds, subseeds = rng.batch_seeds(rng.resolve_seed(p.seed), rng.resolve_seed(p.subseed),
                                      p.subseed_strength, p.n_iter * p.batch_size)
    size = p.batch_size
    return [Batch(n, tuple(seeds[n * size:(n + 1) * size]), tuple(subseeds[n * size:(n + 1) * size]),
                  (p.prompt,) * size, (p.negative_prompt,) * size) for n in range(p.n_iter)]


def flow_shift(job: Job) -> float | None:
    """The time shift of a flow-matching job (explicit, else the family's); None for other models."""
    family = job.model.spec.family
    if family is None:
        return None
    return flow.job_shift(family, job.params.width, job.params.height, job.params.shift)


def schedule_context(job: Job) -> ScheduleContext:
    shift = flow_shift(job)
    if shift is None:
        table = job.engine.discrete_schedule(job.model)
    else:  # flow models: the shifted t in (0, 1] is the sigma
        table = DiscreteSchedule.from_sigmas(flow.flow_sigma_table(shift))
    p = job.params
    return ScheduleContext(sigma_min=p.sigma_min or float(table.sigma_min),
                           sigma_max=p.sigma_max or float(table.sigma_max),
                           model_sigmas=table.sigmas, rho=p.rho, arch=job.model.spec.arch, device=job.model.device,
                           flow=shift is not None)


def make_plan(job: Job, sampler_name: str, scheduler: str, steps: int) -> SamplingPlan:
    """Sigmas and sampler options for one pass, the job's sampler overrides applied."""
    overrides = {k: getattr(job.params, k) for k in SAMPLER_OPTION_FIELDS}
    order = getattr(job.params, "uni_pc_order", None)
    if order is not None and job.engine.registries.samplers.get(sampler_name).name == "UniPC":
        overrides["order"] = max(1, min(order, steps - 1))  # A1111: min(order, steps - 1)
    return plan_sampling(job.engine.registries, sampler_name, scheduler, steps, schedule_context(job), overrides)


def noise(job: Job, batch: Batch, shape: Sequence[int]) -> rng.ImageNoise:
    """Each image's seeded noise stream (variation seed, resize-seed-from and ENSD applied)."""
    p = job.params
    resize_from = None
    if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
        resize_from = (p.seed_resize_from_h // 8, p.seed_resize_from_w // 8)
    return rng.ImageNoise(tuple(shape), list(batch.seeds), list(batch.subseeds), p.subseed_strength,
                          resize_from=resize_from, source=p.rng_source, device=job.model.device,
                          eta_noise_seed_delta=p.eta_noise_seed_delta)


def latent_shape(job: Job, height: int, width: int) -> tuple[int, int, int]:
    family = job.model.spec.family
    channels = family.latent.channels if family is not None else job.model.unet.config.out_channels
    return (channels, height // 8, width // 8)


def add_noise(job: Job, latents: torch.Tensor, noise_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Latents at noise level `sigma`: x0 + sigma * noise; flow models interpolate, (1 - sigma) x0 + sigma * noise.

    A1111's "Extra noise" (img2img and hires) then adds `img2img_extra_noise` times the same noise."""
    if job.model.spec.prediction == "flow":
        x = latents * (1 - sigma) + noise_ * sigma
    else:
        x = latents + noise_ * sigma
    extra = getattr(job.params, "img2img_extra_noise", 0.0)
    return x + noise_ * extra if extra else x


def encode(job: Job, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> scaled latents on the model's device."""
    model = job.model
    return latent_ops.encode(model.vae, latent_ops.from_pil(images), model.spec.vae_scale_factor,
                             job.engine.vae_tiling(), shift=latent_ops.latent_shift(model)).to(model.device)


def inpaint_concat(job: Job, batch: int, height: int, width: int) -> torch.Tensor | None:
    """9-channel inpainting models without a mask: a full mask over a grey image (A1111)."""
    model = job.model
    if not model.spec.is_inpaint:
        return None
    return latent_ops.txt2img_inpaint_concat(model.vae, batch, height, width,
                                             model.spec.vae_scale_factor).to(model.device)


def outdir(job: Job) -> Path:
    return job.params.outdir or job.engine.settings.outputs_dir / f"{job.task}-images"
