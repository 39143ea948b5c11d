"""Typed job parameters and results. Plain, serialisable data (init images and masks are PIL images)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams
from modules.settings import DEFAULT_LIMITS, Limits

MIN_SIZE = 64
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")


@dataclass(frozen=True)
class GenerationParams:
    """What every task shares: prompts, sampler, schedule, seeds, size, batch; A1111's names and defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    rng_source: str = "gpu"
    eta_noise_seed_delta: int = 0
    emphasis: str = "Original"
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    tiling: bool = False  # seamless: the UNet and VAE pad circularly (A1111's "Tiling")
    distilled_cfg_scale: float = 3.5  # FLUX.1-dev's guidance embedding (Forge's name); other models ignore it
    shift: float | None = None  # flow models' time shift; None: the family's (FLUX.1-dev: by resolution)
    save_images: bool = True
    outdir: Path | None = None  # None: Settings.outputs_dir / "<task>-images"
    styles: tuple[str, ...] = ()  # prompt style names, applied in order before the job runs
    extension_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # option values by extension name
    restore_faces: bool = False  # A1111's "Restore faces": after decoding, with face_restoration_model
    face_restoration_model: str = "CodeFormer"  # A1111 option; "CodeFormer", "GFPGAN" or "RestoreFormer"
    code_former_weight: float = 0.5  # A1111 option: CodeFormer's fidelity (0: strongest, 1: closest to input)
    refiner_checkpoint: str | None = None  # A1111 1.10's refiner: a checkpoint name (None / "" / "None": none)
    refiner_switch_at: float | None = None  # fraction of the steps run by the base model; None or 1.0: no refiner
    sd_vae: str | None = None  # this job's VAE (A1111's sd_vae: Automatic, None or a file name); None: the server's
    uni_pc_order: int | None = None  # UniPC's order (A1111's uni_pc_order option); None: the sampler's 3
    img2img_extra_noise: float = 0.0  # A1111's "Extra noise" option: more of the same noise for img2img and hires
    # fields the caller left unset (the API's omitted ones): a FLUX.1 / SD3.5 model gives them its family's defaults
    model_defaults: tuple[str, ...] = ()

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Raise InvalidParams naming the first bad field; sizes and counts within the server's `limits`."""
        _check_size("width", self.width, limits.max_size)
        _check_size("height", self.height, limits.max_size)
        _check_int("steps", self.steps, 1, limits.max_steps)
        _check_int("batch_size", self.batch_size, 1, limits.max_batch_size)
        _check_int("n_iter", self.n_iter, 1, limits.max_n_iter)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_number("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_number("distilled_cfg_scale", self.distilled_cfg_scale, 0.0, 100.0)
        if self.shift is not None:
            _check_number("shift", self.shift, 0.0, 100.0)
        _check_number("subseed_strength", self.subseed_strength, 0.0, 1.0)
        for name in ("seed", "subseed"):
            _check_int(name, getattr(self, name), -1, 2**32 - 1)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = getattr(self, name)
            if value not in (0, -1):
                _check_size(name, value, limits.max_size)
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidParams("prompt and negative_prompt must be text")
        _check_number("code_former_weight", self.code_former_weight, 0.0, 1.0)
        if not isinstance(self.face_restoration_model, str):
            raise InvalidParams("face_restoration_model must be text", field="face_restoration_model")
        if self.refiner_checkpoint is not None and not isinstance(self.refiner_checkpoint, str):
            raise InvalidParams(f"refiner_checkpoint must be a checkpoint name, got {self.refiner_checkpoint!r}")
        if self.refiner_switch_at is not None:
            _check_number("refiner_switch_at", self.refiner_switch_at, 0.0, 1.0)
        if self.sd_vae is not None and not isinstance(self.sd_vae, str):
            raise InvalidParams(f"sd_vae must be a VAE name, Automatic or None, got {self.sd_vae!r}")
        if self.uni_pc_order is not None:
            _check_int("uni_pc_order", self.uni_pc_order, 1, 3)
        _check_number("img2img_extra_noise", self.img2img_extra_noise, 0.0, 1.0)

    @property
    def uses_refiner(self) -> bool:
        """A refiner is named and takes over before the last step (A1111: switch at below 1)."""
        name = (self.refiner_checkpoint or "").strip()
        return name not in ("", "None", "none") and self.refiner_switch_at is not None and self.refiner_switch_at < 1.0

    def to_dict(self) -> dict[str, Any]:
        """Fields by name (shallow: init images and masks stay PIL images)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["outdir"] = str(self.outdir) if self.outdir else None
        return data


@dataclass(frozen=True)
class Txt2ImgParams(GenerationParams):
    """A txt2img job, with A1111's hires fix fields."""

    enable_hr: bool = False
    denoising_strength: float = 0.75  # of the hires pass
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0  # 0: the same as steps
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None: the same sampler
    hr_scheduler: str | None = None  # None: the same schedule type
    hr_prompt: str = ""  # "": the same prompt
    hr_negative_prompt: str = ""

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().validate(limits)
        if self.enable_hr:
            _check_number("denoising_strength", self.denoising_strength, 0.0, 1.0)
            _check_number("hr_scale", self.hr_scale, 1.0, 8.0)
            _check_int("hr_second_pass_steps", self.hr_second_pass_steps, 0, 1000)
            for name in ("hr_resize_x", "hr_resize_y"):
                value = getattr(self, name)
                if value != 0:
                    _check_int(name, value, MIN_SIZE, limits.max_size)
            if not isinstance(self.hr_prompt, str) or not isinstance(self.hr_negative_prompt, str):
                raise InvalidParams("hr_prompt and hr_negative_prompt must be text")
            hires_target(self, limits.max_size)


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
                            f"sizes must lie between {MIN_SIZE} and {max_size}", field="hr_scale")
    return width, height, truncate_x, truncate_y


@dataclass(frozen=True)
class Img2ImgParams(GenerationParams):
    """An img2img job; with a `mask` it is inpainting, with `outpaint` outpainting (A1111's fields).

    `mask`: white (or, for an RGBA mask that is not fully opaque, opaque) pixels are repainted;
    `modules.pipeline.masks.alpha_mask(image)` turns an init image's transparency into one.
    `outpaint`: (left, right, up, down) pixels added around the init image: the result is the init
    image plus the padding with the original pixels untouched; it is generated at width x height
    (the canvas fitted with its aspect kept when the sizes differ, with a warning).
    """

    init_images: tuple = ()  # PIL images: one, or one per image of a batch
    mask: Any = None  # PIL image or None
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    image_cfg_scale: float | None = None  # instruct-pix2pix only (not supported yet: ignored, as A1111 for others)
    mask_blur: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "Only masked"
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0  # 1: inpaint not masked
    initial_noise_multiplier: float = 1.0
    outpaint: tuple[int, int, int, int] | None = None

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().validate(limits)
        _check_images(self.init_images, self.batch_size)
        if self.mask is not None and not _is_image(self.mask):
            raise InvalidParams(f"mask must be an image, got {type(self.mask).__name__}")
        _check_number("denoising_strength", self.denoising_strength, 0.0, 1.0)
        _check_int("resize_mode", self.resize_mode, 0, 3)
        _check_int("mask_blur", self.mask_blur, 0, 256)
        _check_int("inpainting_fill", self.inpainting_fill, 0, 3)
        _check_int("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, 4096)
        _check_int("inpainting_mask_invert", int(self.inpainting_mask_invert), 0, 1)
        _check_number("initial_noise_multiplier", self.initial_noise_multiplier, 0.0, 10.0)
        if self.image_cfg_scale is not None:
            _check_number("image_cfg_scale", self.image_cfg_scale, 0.0, 100.0)
        if self.outpaint is not None:
            _check_outpaint(self, limits.max_size)
        elif self.resize_mode == 3 and self.mask is not None:
            raise InvalidParams("resize_mode 3 (latent upscale) cannot be used with a mask; use 0, 1 or 2")


def _is_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def _check_images(images: Any, batch_size: int) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise InvalidParams("init_images needs at least one image")
    for i, image in enumerate(images):
        if not _is_image(image):
            raise InvalidParams(f"init_images[{i}] must be an image, got {type(image).__name__}")
        if min(image.size) < 1:
            raise InvalidParams(f"init_images[{i}] is empty ({image.width}x{image.height})")
    if len(images) not in (1, batch_size):
        raise InvalidParams(f"give one init image, or batch_size ({batch_size}) of them; got {len(images)}")


def _check_outpaint(p: Img2ImgParams, max_size: int) -> None:
    pads = p.outpaint
    if not isinstance(pads, (list, tuple)) or len(pads) != 4:
        raise InvalidParams(f"outpaint must be (left, right, up, down) pixels, got {pads!r}")
    for name, value in zip(("left", "right", "up", "down"), pads, strict=True):
        _check_int(f"outpaint {name}", value, 0, max_size)
    if not any(pads):
        raise InvalidParams("outpaint needs at least one side above 0 pixels")
    if len({image.size for image in p.init_images}) > 1:
        raise InvalidParams("for outpainting, every init image must have the same size")
    width, height = p.init_images[0].size
    canvas_w, canvas_h = width + pads[0] + pads[1], height + pads[2] + pads[3]
    if max(canvas_w, canvas_h) > 2 * max_size:
        raise InvalidParams(f"outpainting the {width}x{height} image by {tuple(pads)} makes a {canvas_w}x{canvas_h} "
                            f"canvas; it may be at most {2 * max_size} pixels on a side")
    if p.resize_mode == 3:
        raise InvalidParams("resize_mode 3 (latent upscale) cannot be used for outpainting; use 0, 1 or 2")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParams(f"{name} must be between {low} and {high}, got {value}")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidParams(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParams(f"{name} must be between {low} and {high}, got {value}")


def _check_size(name: str, value: Any, max_size: int) -> None:
    _check_int(name, value, MIN_SIZE, max_size)
    if value % 8:
        raise InvalidParams(f"{name} must be a multiple of 8, got {value} "
                            f"(nearest: {value // 8 * 8} or {value // 8 * 8 + 8})")


@dataclass
class Result:
    """What a job produced: images with their infotexts and seeds."""

    images: list = field(default_factory=list)  # PIL images
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None
