"""Detection-table entries for the flow-matching transformers (FLUX.1, SD3.5).

They sit first in detect.py's ordered table: their marker keys never occur in SD checkpoints.
A transformer is found with or without the all-in-one prefix `model.diffusion_model.`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

StateDict = Mapping[str, torch.Tensor]
DIFFUSION_PREFIX = "model.diffusion_model."
FLUX_MARK = "double_blocks.0.img_attn.qkv.weight"
SD3_MARK = "joint_blocks.0.x_block.attn.qkv.weight"


def transformer_prefix(sd: StateDict) -> str | None:
    """'model.diffusion_model.' or '' for a FLUX / SD3 transformer in `sd`, None if there is none."""
    for prefix in (DIFFUSION_PREFIX, ""):
        if prefix + FLUX_MARK in sd or prefix + SD3_MARK in sd:
            return prefix
    return None


@dataclass(frozen=True)
class FlowArch:
    """A detection-table entry for a flow-matching transformer (same `arch` / `matches` shape as ArchSpec)."""

    arch: str
    mark: str  # a key only this transformer kind has
    variant: str = ""  # a key part that tells this variant apart ("" = any)

    def matches(self, sd: StateDict) -> bool:
        prefix = transformer_prefix(sd)
        if prefix is None or prefix + self.mark not in sd:
            return False
        return not self.variant or any(k.startswith(prefix) and self.variant in k for k in sd)


FLOW_ARCHES: tuple[FlowArch, ...] = (
    FlowArch("flux-dev", FLUX_MARK, "guidance_in."),
    FlowArch("flux-schnell", FLUX_MARK),
    FlowArch("sd35-medium", SD3_MARK, ".x_block.attn2."),
    FlowArch("sd35-large", SD3_MARK),
)
