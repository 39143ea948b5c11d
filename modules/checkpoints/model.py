"""Plain data that describes a checkpoint and the model built from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl")  # FLUX.1 / SD3.5: modules.checkpoints.families


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint found on disk (a single file or a diffusers folder)."""

    path: Path
    name: str  # path relative to its models folder, without extension, '/'-separated
    format: str  # "safetensors", "ckpt" or "diffusers"

    @property
    def stem(self) -> str:
        return Path(self.name).name


@dataclass(frozen=True)
class TextEncoderSpec:
    """One CLIP text encoder of a model and how its hidden states are used.

    flavour: "clip_l" (OpenAI CLIP ViT-L layout, SD1 and SDXL's first encoder),
             "open_clip" (OpenCLIP layout, SD2's encoder and SDXL's second).
    layer:   "last" uses the last hidden state + final layer norm (SD1; clip skip moves back);
             "penultimate_norm" uses the penultimate layer + final layer norm (SD2);
             "penultimate" uses the penultimate layer without the final norm (SDXL).
    pad_with_zero: pad token id is 0 after the first EOS (OpenCLIP), else EOS.
    pooled: the encoder provides SDXL's pooled, projected output.
    config: keyword arguments for transformers.CLIPTextConfig.
    """

    flavour: str
    layer: str
    config: dict[str, Any]
    pad_with_zero: bool = False
    pooled: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Architecture detected from keys and shapes, with every width inferred."""

    arch: str  # one of ARCHES, or a flow family name (families.FAMILIES)
    prediction: str  # "eps", "v" or "flow"
    unet_config: dict[str, Any]  # diffusers UNet2DConditionModel config
    vae_config: dict[str, Any]  # diffusers AutoencoderKL config
    text_encoders: tuple[TextEncoderSpec, ...]
    vae_scale_factor: float = 0.18215  # 0.13025 for SDXL
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    family: Any = None  # a modules.checkpoints.families.Family for flow-matching models, else None

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def default_size(self) -> int:
        """The side the family was trained at, in pixels: the UNet's latent sample size times the VAE's 8
        (512 for SD1, 768 for SD2-v, 1024 for SDXL); a flow family declares its own `size` (FLUX.1, SD3.5)."""
        declared = getattr(self.family, "size", None)
        if declared and "sample_size" not in (self.unet_config or {}):
            return int(declared)
        return int((self.unet_config or {}).get("sample_size") or 64) * 8

    @property
    def is_inpaint(self) -> bool:
        return self.unet_config.get("in_channels", 4) == 9

    def alphas_cumprod(self) -> torch.Tensor:
        """The scaled-linear beta schedule that every SD model was trained with."""
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps,
                               dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class LoadedModel:
    """A checkpoint's networks, ready to run. Owned by the model manager."""

    info: CheckpointInfo
    spec: ModelSpec
    model_hash: str  # A1111 short hash, sha256(file)[:10]; "" for diffusers folders
    unet: torch.nn.Module  # diffusers UNet2DConditionModel (Flux / SD3 transformer for flow families)
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoders: list[torch.nn.Module]  # transformers CLIPTextModel / CLIPTextModelWithProjection
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae_name: str | None = None
    vae_hash: str | None = None
    modules: tuple[str, ...] = ()  # FLUX.1 / SD3.5 split components used (file stems), Forge's "Module N"
    weight_dtype: str = ""  # how the UNet / transformer's weights are stored: "Q8_0", "fp8_e4m3fn", "bf16"
    fp8_weight: str | None = None  # A1111's "FP8 weight" infotext ("Enable") when stored as fp8 at load
    t5_source: Any = None  # FLUX.1 / SD3.5: load_mmdit.T5Source, to read T5 again once freed
    active_patch: Any = None  # the running job's ModelPatch (plugins/patch.py), for a T5 read again mid-job
