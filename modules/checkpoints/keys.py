"""Key prefixes of the original (CompVis / Stability) single-file layout, shared by detection and conversion."""
from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = Mapping[str, torch.Tensor]
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
XL_TE1 = "conditioner.embedders.0.transformer."
XL_TE2 = "conditioner.embedders.1.model."


def has_prefix(sd: StateDict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def clip_l_prefix(sd: StateDict, base: str) -> str:
    """Where the CLIP-L text model's keys start (with or without `text_model.`)."""
    return base + "text_model." if has_prefix(sd, base + "text_model.") else base
