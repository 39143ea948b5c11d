"""The stages every task shares: conditioning -> sampling -> decode -> post-process -> save.

Each stage is a function of the `Job` and typed values that returns a new value; tasks
(txt2img.py, img2img.py, hires.py) supply the inputs stage and compose these. `run_stage`
calls a stage between the hooks' `before_stage` and `after_stage`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from modules import images as image_files
from modules import infotext
from modules.errors import InvalidParams
from modules.faces.service import canonical_name
from modules.pipeline import latents as latent_ops
from modules.pipeline import refiner as refiner_ops
from modules.pipeline.control import Progress
from modules.pipeline.hooks import Denoiser, DenoiserContext, StepClock
from modules.pipeline.job import Batch, Job, outdir
from modules.pipeline.sampling import Sampled, SamplingPlan, noise_sampler_for, run_sampler
from modules.sampling import rng
from modules.sampling.denoisers import CFGDenoiser, denoiser_class

VERSION = "atelier-0.1.0"


def run_stage(job: Job, name: str, stage: Callable[..., Any], *args: Any) -> Any:
    """`stage(*args)` between the job hooks' before_stage and after_stage (which may replace the value)."""
    job.hooks.before_stage(name, job)
    return job.hooks.after_stage(name, job, stage(*args))


# -- conditioning ------------------------------------------------------------------
@dataclass(frozen=True)
class Conditioning:
    """Per image: the prompt's `AND` parts [(schedule, weight), ...] and the negative's schedule."""

    conds: Sequence[Any]
    unconds: Sequence[Any]
    prompts: Sequence[str] = ()  # what was encoded, so a refiner can encode it with its own text encoders
    negatives: Sequence[str] = ()
    hires_steps: int | None = None


def condition(job: Job, prompts: Sequence[str], negatives: Sequence[str],
              hires_steps: int | None = None) -> Conditioning:
    """Prompts -> scheduled text conditioning (the hires pass's schedule with `hires_steps`)."""
    conds, unconds = job.conditioner.for_batch(list(prompts), list(negatives), job.params.steps,
                                               hires_steps=hires_steps)
    release = getattr(job.engine, "t5_release", None)  # --t5-after-encoding free
    if release is not None and release.model is job.model:
        release.free()
    return Conditioning(conds, unconds, tuple(prompts), tuple(negatives), hires_steps)


# -- sampling ------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingInput:
    """One sampling pass over one batch."""

    pass_name: str  # "first" or "hires"
    plan: SamplingPlan
    cond: Conditioning
    x: torch.Tensor  # the starting latents (noise already added)
    noise: rng.ImageNoise  # the images' noise streams, for ancestral and SDE samplers
    width: int  # the size SDXL is conditioned on
    height: int
    concat: torch.Tensor | None = None  # 9-channel inpainting conditioning
    fallback: torch.Tensor | None = None  # returned when stopped before the first step
    step_offset: int = 0  # progress: steps of earlier passes of this batch
    steps_per_batch: int = 0  # progress: every pass of a batch together
    blend: Callable[[Denoiser], Denoiser] | None = None  # the task's own wrapper (inpainting's mask blend)
    init_images: Sequence[Image.Image] = ()  # img2img: the working init images, for conditioning hooks
    mask: Image.Image | None = None  # img2img: the working mask, for conditioning hooks


def build_denoiser(job: Job, s: SamplingInput, context: DenoiserContext) -> Denoiser:
    """The model wrapper for the model's prediction type, CFG over it, then the wrappers.

    With a refiner in this pass, the guided denoiser switches to the refiner's at its step."""
    guided = guided_denoiser(job, job.model, s.cond, s, context)
    if job.refiner is not None and refiner_ops.runs_in(job.params, s.pass_name):
        steps = len(s.plan.sigmas) - 1
        at = refiner_ops.switch_step(job.refiner.switch_at, steps)
        if at < steps:
            guided = refiner_ops.SwitchDenoiser(guided, guided_denoiser(
                job, job.refiner.model, refiner_conditioning(job, s.cond), s, context), at)
    if s.blend is not None:
        guided = s.blend(guided)
    return job.hooks.wrap_denoiser(guided, context)


def guided_denoiser(job: Job, model: Any, cond: Conditioning, s: SamplingInput,
                    context: DenoiserContext) -> Denoiser:
    """CFG over `model`'s wrapper for its prediction type (the job's model, or its refiner)."""
    time_ids = None
    if model.spec.is_sdxl:
        time_ids = torch.tensor([[s.height, s.width, 0, 0, s.height, s.width]], dtype=torch.float32)
    extra = {"guidance": job.params.distilled_cfg_scale} if model.spec.family is not None else {}
    residuals = job.hooks.unet_residuals(context)  # conditioning hooks (ControlNet): UNets and FLUX.1
    attention = job.hooks.unet_cross_attention(context)  # (IP-Adapter)
    hidden = getattr(job.hooks, "unet_hidden_states", lambda _: None)(context)  # (reference-only)
    if model.spec.family is None:
        if model.spec.arch == job.model.spec.arch:  # a refiner of another architecture runs without them
            extra.update(residuals=residuals, cross_attention=attention)
            extra.update({"hidden_states": hidden} if hidden is not None else {})
    elif model.spec.family.transformer == "flux" and attention is None and hidden is None:
        extra["residuals"] = residuals  # per-block residuals (FLUX ControlNets)
    elif residuals is not None or attention is not None or hidden is not None:
        raise InvalidParams(f"an extension adds conditioning inside the UNet (ControlNet, IP-Adapter), but {model.spec.arch} "
                            "has no UNet: conditioning hooks work with SD1.5, SD2.x and SDXL checkpoints (and per-block "
                            "residuals with FLUX.1) only")
    inner = denoiser_class(model.spec.prediction)(model.unet, job.engine.discrete_schedule(model).sigma_to_t,
                                                  time_ids=time_ids, **extra)
    return CFGDenoiser(job.hooks.wrap_model(inner, context), cond.conds, cond.unconds,
                       job.params.cfg_scale, job.control.check, s.concat, on_guided=job.hooks.on_guided)


def refiner_conditioning(job: Job, cond: Conditioning) -> Conditioning:
    """The pass's prompts through the refiner's own text encoders (the same conditioning for the base model)."""
    if job.refiner.model is job.model:
        return cond
    conds, unconds = job.refiner.conditioner.for_batch(list(cond.prompts), list(cond.negatives), job.params.steps,
                                                       hires_steps=cond.hires_steps)
    return Conditioning(conds, unconds, cond.prompts, cond.negatives, cond.hires_steps)


def sample(job: Job, batch: Batch, s: SamplingInput) -> Sampled:
    """Run one pass; an interrupt or skip comes back as `Sampled.stop`."""
    context = DenoiserContext(job.task, s.pass_name, job.params, s.width, s.height, s.cond.conds,
                              s.cond.unconds, job.params.cfg_scale, s.plan.sigmas, StepClock(),
                              arch=job.model.spec.arch, init_images=tuple(s.init_images), mask=s.mask,
                              encode=lambda pixels: encode_pixels(job, pixels))
    denoiser = build_denoiser(job, s, context)
    device = job.model.device

    def on_step(step: int, denoised: torch.Tensor) -> None:
        context.clock.step = step
        report(job, batch.index, s.step_offset + step, s.steps_per_batch, denoised)

    x = s.x.to(device)
    noise = noise_sampler_for(s.plan, x, list(batch.seeds), lambda: s.noise.next().to(device),
                              job.engine.settings.sde_noise)
    return run_sampler(s.plan, denoiser, x, noise, on_step, s.fallback)


def encode_pixels(job: Job, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the job model's scaled latents on its device (`DenoiserContext.encode`)."""
    model = job.model
    return latent_ops.encode(model.vae, pixels, model.spec.vae_scale_factor, job.engine.vae_tiling(),
                             shift=latent_ops.latent_shift(model)).to(model.device)


def report(job: Job, n: int, step: int, steps: int, denoised: torch.Tensor) -> None:
    """Progress for step `step` of `steps`, with a cheap preview every `preview_every` steps."""
    if job.on_progress is None:
        return
    every = max(job.engine.settings.preview_every, 1)
    preview = None
    if step % every == 0 or step == steps:
        preview = latent_ops.cheap_preview(denoised[0][:4], job.model.spec.is_sdxl)
    job.on_progress(Progress(n, job.params.n_iter, step, steps, preview))


# -- decode, post-process, save --------------------------------------------------------
@dataclass(frozen=True)
class Decoded:
    images: tuple[Image.Image, ...]
    warnings: tuple[str, ...] = ()


def decode(job: Job, latents: torch.Tensor) -> Decoded:
    model = job.model
    pixels, fell_back = latent_ops.decode(model.vae, latents, model.spec.vae_scale_factor, job.engine.vae_tiling(),
                                          shift=latent_ops.latent_shift(model))
    warnings = ("NaNs in the VAE output: the VAE now runs in fp32",) if fell_back else ()
    return Decoded(tuple(latent_ops.to_pil(pixels)), warnings)


def postprocess(job: Job, batch: Batch, images: Sequence[Image.Image], first_index: int,
                finish: Callable[[Image.Image, int], Image.Image]) -> tuple[Image.Image, ...]:
    """Face restoration (`restore_faces`), the hooks' post-processors, then the task's `finish`
    (inpainting pastes back), per image."""
    restore = face_restorer(job)
    out = []
    for i, image in enumerate(images):
        if restore is not None:
            image = restore(image)
        image = job.hooks.postprocess(image, job.params, first_index + i, batch.seeds[i], batch.subseeds[i])
        out.append(finish(image, i))
    return tuple(out)


def face_restorer(job: Job) -> Callable[[Image.Image], Image.Image] | None:
    """The job's face restoration (A1111's "Restore faces"), or None when it is off."""
    p = job.params
    if not getattr(p, "restore_faces", False):
        return None
    faces = getattr(job.engine.registries, "face_restorers", None)
    if faces is None:
        raise InvalidParams("Face restoration is not available in this process", field="restore_faces")
    return lambda image: faces.restore(image, p.face_restoration_model, p.code_former_weight)


@dataclass(frozen=True)
class Saved:
    """A batch's finished images with their infotexts and, when saved, their paths."""

    images: tuple[Image.Image, ...]
    infotexts: tuple[str, ...]
    paths: tuple[Any, ...] = ()


@dataclass(frozen=True)
class InfotextFields:
    """A task's infotext keys besides the base ones: `fields` before the hooks' and `last` after all."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    last: Mapping[str, Any] = field(default_factory=dict)


def save(job: Job, batch: Batch, images: Sequence[Image.Image], plan: SamplingPlan,
         extra: InfotextFields) -> Saved:
    """Write each image's infotext (PNG "parameters") and save it when the job asks to."""
    texts, paths = [], []
    for i, image in enumerate(images):
        fields = infotext_fields(job, plan, extra, batch.seeds[i], batch.subseeds[i])
        text = infotext.build(batch.prompts[i], batch.negatives[i], fields)
        image.info["parameters"] = text
        texts.append(text)
        if job.params.save_images:
            paths.append(image_files.save_image(image, outdir(job), batch.seeds[i], text))
            job.hooks.saved(paths[-1], job.params, text)
    return Saved(tuple(images), tuple(texts), tuple(paths))


def infotext_fields(job: Job, plan: SamplingPlan, extra: InfotextFields, seed: int, subseed: int) -> dict[str, Any]:
    fields = base_infotext_fields(job.params, plan, job.model, seed, subseed)
    version = fields.pop("Version")
    refiner = refiner_ops.infotext_fields(job.refiner)
    extra_noise = getattr(job.params, "img2img_extra_noise", 0.0)
    if extra_noise and (job.task == "img2img" or getattr(job.params, "enable_hr", False)):
        refiner = {"Extra noise": extra_noise, **refiner}
    return {**fields, **extra.fields, **refiner, **job.hooks.infotext(), "Version": version, **extra.last}


def base_infotext_fields(params: Any, plan: SamplingPlan, model: Any, seed: int, subseed: int) -> dict[str, Any]:
    """A1111's infotext keys for one image (the infotext module orders them)."""
    varied = params.subseed_strength > 0
    resized = params.seed_resize_from_w > 0 and params.seed_resize_from_h > 0
    return {
        "Steps": params.steps,
        "Sampler": plan.sampler.name,
        "Schedule type": plan.scheduler.label,
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Face restoration": canonical_name(params.face_restoration_model) if getattr(params, "restore_faces", False)
        else None,
        "Size": f"{params.width}x{params.height}",
        "Model hash": model.model_hash or None,
        "Model": model.info.stem,
        "FP8 weight": getattr(model, "fp8_weight", None),
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
        "Tiling": True if params.tiling else None,
        **flow_infotext(params, model),
        "Weight dtype": stored_weight_format(model),
        "Version": VERSION,
    }


_COMPUTE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def stored_weight_format(model: Any) -> str | None:
    """How the diffusion model's weights are stored ("Q8_0", "fp8_e4m3fn"), when not in the compute dtype."""
    stored = getattr(model, "weight_dtype", "")
    return stored if stored and stored != _COMPUTE_NAMES.get(str(getattr(model, "dtype", ""))) else None


def flow_infotext(params: Any, model: Any) -> dict[str, Any]:
    """Forge's keys for FLUX.1 / SD3.5: Distilled CFG Scale (dev), Shift (explicit or static), Module N."""
    family = model.spec.family
    modules = {f"Module {i}": name for i, name in enumerate(getattr(model, "modules", ()), start=1)}
    if family is None:
        return modules  # an SD UNet alone names its split parts too
    fields: dict[str, Any] = {}
    if family.distilled_cfg is not None:
        fields["Distilled CFG Scale"] = params.distilled_cfg_scale
    if params.shift or family.dynamic_shift is None:
        fields["Shift"] = params.shift or family.shift
    return {**fields, **modules}
