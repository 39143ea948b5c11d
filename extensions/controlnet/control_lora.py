"""Stability's Control-LoRA files: a ControlNet stored as low-rank deltas on the base UNet.

A file is marked by a `lora_controlnet` tensor. Its other keys use lllyasviel's ControlNet names
(`input_blocks.*`, `middle_block.*`, `time_embed.*`, `label_emb.*`) without prefix: a module with
`<module>.up` and `<module>.down` gets `base weight + up.flatten(1) @ down.flatten(1)`; a full tensor
(`<module>.bias`, norms, and the control-only `input_hint_block`, `zero_convs`, `middle_block_out`)
replaces the base's; every other tensor is the loaded checkpoint's UNet's. So the ControlNet is
built per base checkpoint, from its UNet's (diffusers-keyed) tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from modules.plugins import api

StateDict = Mapping[str, torch.Tensor]
MARK = "lora_controlnet"
_UNET_PARTS = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


def is_control_lora(sd: StateDict) -> bool:
    return MARK in sd


def arch_of(sd: StateDict) -> str:
    """"sdxl" with the size embedding; "sd2" with linear attention projections; else "sd1"."""
    if any(k.startswith("label_emb.") for k in sd):
        return "sdxl"
    linear = any(k.endswith("proj_in.up") and v.ndim == 2 or k.endswith("proj_in.weight") and v.ndim == 2
                 for k, v in sd.items())
    return "sd2" if linear else "sd1"


def split(sd: StateDict) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module -> (up, down)) and the full tensors, by ldm name."""
    pairs, full = {}, {}
    for key, value in sd.items():
        if key == MARK:
            continue
        if key.endswith(".up"):
            down = sd.get(key[:-3] + ".down")
            if down is None:
                raise api.InvalidParams(f"Control-LoRA tensor {key} has no matching .down")
            pairs[key[:-3]] = (value, down)
        elif not key.endswith(".down"):
            full[key] = value
    return pairs, full


def compose(sd: StateDict, base: StateDict, name: str,
            convert: Callable[[StateDict], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The ControlNet's diffusers-keyed tensors: base UNet + deltas + the file's full tensors.

    `convert(ldm-named dict) -> diffusers-named dict` is the original-layout key conversion."""
    pairs, full = split(sd)
    names = {**full, **{f"{module}.weight": up for module, (up, _) in pairs.items()}}
    converted = convert(names)  # same order of keys: the diffusers name of every ldm name
    renamed = dict(zip(names, converted, strict=True))
    state = {k: v for k, v in base.items() if k.startswith(_UNET_PARTS)}
    for ldm, key in renamed.items():
        if ldm in full:
            state[key] = full[ldm]
            continue
        if key not in state:
            raise api.InvalidParams(f"Control-LoRA {name}: the loaded checkpoint's UNet has no {key} for its "
                                    "low-rank delta: it was made for another architecture")
        up, down = pairs[ldm[: -len(".weight")]]
        weight = state[key]
        delta = up.flatten(1).float() @ down.flatten(1).float()
        if delta.numel() != weight.numel():
            raise api.InvalidParams(f"Control-LoRA {name}: its delta for {key} has {tuple(delta.shape)} values, the "
                                    f"loaded checkpoint's weight {tuple(weight.shape)}: made for another architecture")
        state[key] = (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
    return state
