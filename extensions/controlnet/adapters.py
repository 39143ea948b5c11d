"""T2I-Adapters (TencentARC): reading both file layouts and building diffusers' `T2IAdapter`.

Layouts:
- "t2i-original": TencentARC's `Adapter` (`conv_in`, then `body.N.{in_conv,block1,block2}` with
  N = level * blocks_per_level + block; the released models use `sk=True`, so no `skep`);
- "t2i-diffusers": diffusers' keys (`adapter.conv_in`, `adapter.body.L.resnets.J.block1`, ...),
  a single file or a folder with `config.json`.
The family comes from the pixel-unshuffle factor: `conv_in` takes 3 * 8^2 channels (SD1.5/SD2)
or 3 * 16^2 (SDXL, `full_adapter_xl`). The features are added inside the UNet's down blocks
(`UNetResiduals.intrablock`), as diffusers' `down_intrablock_additional_residuals`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modules.plugins import api

StateDict = Mapping[str, torch.Tensor]
_UNSHUFFLE = {8: "sd1", 16: "sdxl"}


def is_original(sd: StateDict) -> bool:
    return "conv_in.weight" in sd and "body.0.block1.weight" in sd and "body.0.block2.weight" in sd


def is_diffusers(sd: StateDict) -> bool:
    return "adapter.conv_in.weight" in sd and "adapter.body.0.resnets.0.block1.weight" in sd


def _blocks_per_level(sd: StateDict) -> int:
    """Resnet blocks per level of an original adapter: the first block that changes channels starts level 1."""
    first = int(sd["conv_in.weight"].shape[0])
    n = 0
    while f"body.{n}.block1.weight" in sd:
        if f"body.{n}.in_conv.weight" in sd or int(sd[f"body.{n}.block1.weight"].shape[0]) != first:
            return n
        n += 1
    return n


def original_to_diffusers(sd: StateDict) -> dict[str, torch.Tensor]:
    """TencentARC's adapter keys -> diffusers T2IAdapter keys; InvalidParams for variants diffusers lacks."""
    if any(".skep." in k for k in sd):
        raise api.InvalidParams("this T2I-Adapter uses skip convolutions (`skep`, sk=False), which no released "
                                "SD1.5/SDXL adapter has; Atelier cannot load it")
    per_level = _blocks_per_level(sd)
    if per_level == 0:
        raise api.InvalidParams("this T2I-Adapter has no resnet blocks after conv_in")
    out = {}
    for key, value in sd.items():
        if key.startswith("conv_in."):
            out[f"adapter.{key}"] = value
            continue
        head, index, rest = key.split(".", 2)
        if head != "body" or not index.isdigit():
            raise api.InvalidParams(f"Unsupported T2I-Adapter layout: unexpected tensor {key}")
        level, block = divmod(int(index), per_level)
        if rest.startswith("in_conv."):
            out[f"adapter.body.{level}.{rest}"] = value
        else:
            out[f"adapter.body.{level}.resnets.{block}.{rest}"] = value
    return out


def _levels(sd: StateDict) -> list[int]:
    return sorted({int(k.split(".")[2]) for k in sd if k.startswith("adapter.body.")})


def arch_of(sd: StateDict) -> str:
    """"sd1" (covers SD2, whose adapters share the layout) or "sdxl", from the unshuffle factor."""
    factor = round((int(sd["adapter.conv_in.weight"].shape[1]) / 3) ** 0.5)
    if factor not in _UNSHUFFLE:
        raise api.InvalidParams(f"this T2I-Adapter unshuffles by {factor}; known: 8 (SD1.5) and 16 (SDXL)")
    return _UNSHUFFLE[factor]


def infer_config(sd: StateDict) -> dict[str, Any]:
    """A diffusers T2IAdapter config from its tensors."""
    levels = _levels(sd)
    channels = [int(sd[f"adapter.body.{lv}.resnets.0.block1.weight"].shape[0]) for lv in levels]
    blocks = len({k.split(".")[4] for k in sd if k.startswith("adapter.body.0.resnets.")})
    xl = arch_of(sd) == "sdxl"
    return {"in_channels": 3, "channels": channels, "num_res_blocks": blocks, "downscale_factor": 16 if xl else 8,
            "adapter_type": "full_adapter_xl" if xl else "full_adapter"}


def build_adapter(state: StateDict, config: Mapping[str, Any] | None, name: str, device: torch.device,
                  dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' T2IAdapter with the file's tensors; InvalidParams when they do not fit the config."""
    from diffusers import T2IAdapter

    config = dict(config) if config is not None else infer_config(state)
    with torch.device("meta"):
        model = T2IAdapter.from_config(config)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    extra += [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or extra:
        raise api.InvalidParams(f"T2I-Adapter {name} does not fit its detected layout: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
