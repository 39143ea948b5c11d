"""txt2img: prompts -> conditioning -> noise -> sampling -> decode -> saved images."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modules import images as image_files
from modules import infotext
from modules.pipeline import latents as latent_ops
from modules.pipeline.conditioning import PromptConditioner
from modules.pipeline.control import JobControl, Progress, ProgressCallback
from modules.pipeline.params import Result, Txt2ImgParams
from modules.pipeline.sampling import SamplingPlan, plan_sampling, run_sampler
from modules.plugins.specs import ScheduleContext
from modules.sampling import rng
from modules.sampling.denoisers import CFGDenoiser, ModelDenoiser

VERSION = "atelier-0.1.0"


@dataclass(frozen=True)
class BatchSeeds:
    seeds: list[int]
    subseeds: list[int]


def infotext_fields(params: Txt2ImgParams, plan: SamplingPlan, model, seed: int, subseed: int) -> dict:
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
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "ENSD": params.eta_noise_seed_delta or None,
        "RNG": params.rng_source.upper() if params.rng_source != "gpu" else None,
        "Emphasis": params.emphasis if params.emphasis != "Original" else None,
        "Version": VERSION,
    }


def initial_noise_scale(plan: SamplingPlan) -> torch.Tensor:
    """txt2img starts from noise * sigma_max; DDIM from unit noise in VP space, as A1111 and diffusers."""
    sigma = plan.sigmas[0]
    return (sigma**2 + 1.0) ** 0.5 if plan.sampler.vp_start else sigma


def schedule_context(engine, model, params: Txt2ImgParams) -> ScheduleContext:
    table = engine.discrete_schedule(model)
    return ScheduleContext(
        sigma_min=params.sigma_min or float(table.sigma_min),
        sigma_max=params.sigma_max or float(table.sigma_max),
        model_sigmas=table.sigmas, rho=params.rho, arch=model.spec.arch, device=model.device)


def _model_denoiser(engine, model, params: Txt2ImgParams) -> ModelDenoiser:
    time_ids = None
    if model.spec.is_sdxl:
        h, w = params.height, params.width
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
    return ModelDenoiser(model.unet, engine.discrete_schedule(model).sigma_to_t,
                         model.spec.prediction, time_ids=time_ids)


def _noise(params: Txt2ImgParams, seeds: BatchSeeds, shape: Sequence[int], device) -> rng.ImageNoise:
    resize_from = None
    if params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0:
        resize_from = (params.seed_resize_from_h // 8, params.seed_resize_from_w // 8)
    return rng.ImageNoise(tuple(shape), seeds.seeds, seeds.subseeds, params.subseed_strength,
                          resize_from=resize_from, source=params.rng_source, device=device,
                          eta_noise_seed_delta=params.eta_noise_seed_delta)


class Txt2ImgRun:
    """One txt2img job on one loaded model."""

    def __init__(self, engine, params: Txt2ImgParams, control: JobControl | None,
                 on_progress: ProgressCallback | None) -> None:
        params.validate()
        self.engine = engine
        self.params = params
        self.model = engine.require_model()
        self.control = control or JobControl()
        self.on_progress = on_progress
        overrides = {k: getattr(params, k) for k in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")}
        self.plan = plan_sampling(engine.registries, params.sampler_name, params.scheduler, params.steps,
                                  schedule_context(engine, self.model, params), overrides)
        self.conditioner = PromptConditioner(engine.text_conditioner(self.model), params.clip_skip,
                                             params.emphasis, zero_empty_negative=self.model.spec.is_sdxl)
        self.result = Result()
        self.samples: list[torch.Tensor] = []  # each batch's final latents, for tests and hires fix

    def run(self) -> Result:
        p = self.params
        seeds, subseeds = rng.batch_seeds(rng.resolve_seed(p.seed), rng.resolve_seed(p.subseed),
                                          p.subseed_strength, p.n_iter * p.batch_size)
        for n in range(p.n_iter):
            if self.control.interrupted:
                break
            part = slice(n * p.batch_size, (n + 1) * p.batch_size)
            self._run_batch(n, BatchSeeds(seeds[part], subseeds[part]))
            self.control.clear_skip()
        self.result.interrupted = self.control.interrupted
        tags = sorted({f"{t.name}:{t.args[0] if t.args else ''}" for t in self.conditioner.extra_network_tags})
        if tags:
            self.result.warnings.append(f"Extra networks are not supported yet, ignored: {', '.join(tags)}")
        return self.result

    def _run_batch(self, n: int, seeds: BatchSeeds) -> None:
        p, model = self.params, self.model
        prompts, negatives = [p.prompt] * p.batch_size, [p.negative_prompt] * p.batch_size
        conds, unconds = self.conditioner.for_batch(prompts, negatives, p.steps)
        shape = (model.unet.config.out_channels, p.height // 8, p.width // 8)
        noise = _noise(p, seeds, shape, model.device)
        x = noise.first().to(model.device) * initial_noise_scale(self.plan)
        concat = None
        if model.spec.is_inpaint:
            concat = latent_ops.txt2img_inpaint_concat(model.vae, p.batch_size, p.height, p.width,
                                                       model.spec.vae_scale_factor).to(model.device)
        denoiser = CFGDenoiser(_model_denoiser(self.engine, model, p), conds, unconds, p.cfg_scale,
                               self.control, concat)
        samples, _ = run_sampler(self.plan, denoiser, x, lambda *_: noise.next().to(model.device),
                                 lambda step, denoised: self._report(n, step, denoised))
        self.samples.append(samples)
        decoded, fell_back = latent_ops.decode(model.vae, samples, model.spec.vae_scale_factor)
        if fell_back:
            self.result.warnings.append("NaNs in the VAE output: the VAE now runs in fp32")
        self._collect(latent_ops.to_pil(decoded), seeds, prompts, negatives)

    def _report(self, n: int, step: int, denoised: torch.Tensor) -> None:
        if self.on_progress is None:
            return
        every = max(self.engine.settings.preview_every, 1)
        preview = None
        if step % every == 0 or step == self.params.steps:
            preview = latent_ops.cheap_preview(denoised[0], self.model.spec.is_sdxl)
        self.on_progress(Progress(n, self.params.n_iter, step, self.params.steps, preview))

    def _collect(self, pil_images, seeds: BatchSeeds, prompts, negatives) -> None:
        p = self.params
        outdir = p.outdir or self.engine.settings.outputs_dir / "txt2img-images"
        for i, image in enumerate(pil_images):
            fields = infotext_fields(p, self.plan, self.model, seeds.seeds[i], seeds.subseeds[i])
            text = infotext.build(prompts[i], negatives[i], fields)
            image.info["parameters"] = text
            self.result.images.append(image)
            self.result.infotexts.append(text)
            self.result.seeds.append(seeds.seeds[i])
            self.result.subseeds.append(seeds.subseeds[i])
            self.result.prompts.append(prompts[i])
            self.result.negative_prompts.append(negatives[i])
            if p.save_images:
                self.result.paths.append(image_files.save_image(image, outdir, seeds.seeds[i], text))


def txt2img(engine, params: Txt2ImgParams, control: JobControl | None = None,
            on_progress: ProgressCallback | None = None) -> Result:
    return Txt2ImgRun(engine, params, control, on_progress).run()
