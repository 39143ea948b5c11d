"""Request and response shapes of the A1111 API (same field names and defaults) and the jobs API."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 clients send fields we have no use for


class Txt2ImgRequest(_Request):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"  # deprecated A1111 spelling of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    script_name: str | None = None
    script_args: list[Any] | dict[str, Any] = Field(default_factory=list)  # A1111's ui() order, or by name
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None
    distilled_cfg_scale: float = 3.5  # FLUX.1-dev's guidance embedding, as Forge takes it
    shift: float | None = None  # flow models' time shift (None: the model's)
    refiner_checkpoint: str | None = None  # A1111 1.10: a checkpoint name or title
    refiner_switch_at: float | None = None  # fraction of the steps before the refiner takes over


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs with their infotext")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: prompt, all_seeds, infotexts, ...")


class PngInfoRequest(_Request):
    image: str


class JobRequest(_Request):
    """POST /api/v1/jobs: `params` uses the A1111 field names of txt2img or img2img."""

    kind: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    params: dict[str, Any] = Field(default_factory=dict)


class JobCreated(BaseModel):
    id: str
    position: int | None
    state: str
