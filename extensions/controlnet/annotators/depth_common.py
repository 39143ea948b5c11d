"""Helpers shared by the depth and normal annotators: reading a file, the network input, the output map."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from modules.plugins import api

from . import read_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in float32 (fp16 copies exist); a truncated or foreign file is an InvalidParams naming it."""
    try:
        tensors = read_tensors(path)
    except api.InvalidParams:
        raise
    except Exception as err:  # safetensors' own error for a truncated or damaged header
        raise api.InvalidParams(f"Annotator file {path} could not be read ({type(err).__name__}: {str(err)[:120]}); "
                                "download it again") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def normalized_rgb(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A 1x3xHxW float tensor of an RGB uint8 image: (x / 255 - mean) / std."""
    x = torch.from_numpy(np.array(img[..., :3])).float().div(255).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def min_max_uint8(depth: torch.Tensor) -> np.ndarray:
    """Depth scaled to 0..255 by its own minimum and maximum (flat depth gives zeros), truncated to uint8."""
    d = depth.double()
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * 255.0 if span > 0 else torch.zeros_like(d)
    return scaled.numpy().astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def renamed_vit_state(sd: dict[str, torch.Tensor], blocks: str, new_blocks: str,
                      rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """A timm ViT-based state dict under transformers' names: each fused `attn.qkv` under `blocks` split into
    query, key and value under `new_blocks`; every other key through `rename` (None: dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            block, kind = key.split(".attn.qkv.")
            split_qkv(out, block.replace(blocks, new_blocks), kind, value)
        elif (new := rename(key)) is not None:
            out[new] = value
    return out


def split_qkv(out: dict[str, torch.Tensor], block: str, kind: str, value: torch.Tensor) -> None:
    """A timm block's fused `attn.qkv` weight or bias as transformers' query, key and value."""
    for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
        out[f"{block}.attention.attention.{name}.{kind}"] = part.contiguous()


def dpt_neck_key(key: str, scratch: str) -> str | None:
    """transformers' name for a DPT neck tensor under the original `scratch` prefix ("scratch." in MiDaS,
    "depth_head.scratch." in Depth Anything): `layerN_rn` convs and the `refinenetN` fusion blocks; None otherwise."""
    if m := re.match(re.escape(scratch) + r"layer(\d)_rn\.(.+)", key):
        return f"neck.convs.{int(m.group(1)) - 1}.{m.group(2)}"
    if m := re.match(re.escape(scratch) + r"refinenet(\d)\.(.+)", key):
        rest = m.group(2).replace("out_conv.", "projection.").replace("resConfUnit", "residual_layer")
        rest = re.sub(r"\bconv(\d)\.", r"convolution\1.", rest)
        return f"neck.fusion_stage.layers.{4 - int(m.group(1))}.{rest}"
    return None
