"""The demo model's networks: diffusers / transformers modules at small widths, SD 1.x architecture.

Widths are chosen so that the engine's shape-based detection infers exactly what was trained:
SD1's rule of 8 attention heads per UNet block, and CLIP heads = hidden // 64.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

VOCAB = 49408
POSITIONS = 77


@dataclass(frozen=True)
class DemoArch:
    """All widths of the demo model (the defaults are what ships)."""

    image_size: int = 128
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (True, True, False)  # SD1: no attention at the lowest level
    unet_layers: int = 1
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)  # 4 levels: downsampling factor 8
    clip_hidden: int = 128
    clip_layers: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unet_config(self) -> dict[str, Any]:
        return {
            "sample_size": self.image_size // 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": list(self.unet_channels), "layers_per_block": self.unet_layers,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.unet_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.unet_attention)],
            "cross_attention_dim": self.clip_hidden, "attention_head_dim": 8,  # diffusers: 8 heads (SD1)
            "transformer_layers_per_block": 1, "use_linear_projection": False,
        }

    def vae_config(self) -> dict[str, Any]:
        n = len(self.vae_channels)
        return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(self.vae_channels),
                "layers_per_block": 1, "latent_channels": 4, "sample_size": self.image_size,
                "scaling_factor": 0.18215}

    def clip_config(self) -> dict[str, Any]:
        return {"vocab_size": VOCAB, "hidden_size": self.clip_hidden, "intermediate_size": 4 * self.clip_hidden,
                "num_hidden_layers": self.clip_layers, "num_attention_heads": max(1, self.clip_hidden // 64),
                "max_position_embeddings": POSITIONS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "projection_dim": self.clip_hidden, "bos_token_id": 49406, "eos_token_id": 49407,
                "pad_token_id": 49407}


@dataclass
class DemoNets:
    """The three trainable networks."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def build_nets(arch: DemoArch, seed: int) -> DemoNets:
    """Freshly initialised networks, reproducible from `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet_config())
    vae = AutoencoderKL(**arch.vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.clip_config()))
    return DemoNets(unet, vae, text_encoder)
