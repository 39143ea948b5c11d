"""Depth Anything V2 (`depth_anything_v2`) through transformers' `DepthAnythingForDepthEstimation`.

The file may be the original repository's checkpoint (`pretrained.*` DINOv2 keys and `depth_head.*`
DPT keys, as `depth_anything_v2_vits.pth` or its safetensors copy) or a transformers folder's
`model.safetensors` (`backbone.*`, `neck.*`, `head.*`). The config is read from the tensor shapes;
nothing is downloaded. As sd-webui-controlnet does, the image is resized (bicubic) so its short side is
518 and both sides are multiples of 14, the inverse depth is brought back to the input size (bilinear)
and min-max scaled to 0..255. (sd-webui-controlnet hands the network BGR by an extra colour swap; the
network is trained on RGB, which it gets here.)
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.plugins import api

from . import Runner
from .depth_common import (
    dpt_neck_key,
    gray_to_rgb,
    load_weights,
    min_max_uint8,
    normalized_rgb,
    renamed_vit_state,
)

INPUT_SIZE = 518
HEAD_DIM = 64  # every DINOv2 size (S, B, L, g) uses 64-wide attention heads


def build(path: Path) -> Runner:
    """The runner of one Depth Anything V2 file."""
    model = load_model(path)

    def run(img: np.ndarray, resolution, a, b, seed) -> np.ndarray:
        return gray_to_rgb(min_max_uint8(predict(model, img)))

    return run


def load_model(path: Path):
    from transformers import DepthAnythingForDepthEstimation

    tensors = to_transformers_keys(load_weights(path), path)
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(config_from_shapes(tensors, path))
    tensors = attention_names(tensors, model.state_dict().keys())
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def predict(model, img: np.ndarray) -> torch.Tensor:
    """Relative inverse depth (HxW float) of an RGB uint8 image, at the image's size."""
    h, w = img.shape[:2]
    x = normalized_rgb(img)
    x = F.interpolate(x, size=net_size(h, w, INPUT_SIZE, 14), mode="bicubic", align_corners=False)
    depth = model(pixel_values=x).predicted_depth[:, None]
    return F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def net_size(h: int, w: int, size: int, multiple: int) -> tuple[int, int]:
    """Scale so both sides reach `size` (keeping the aspect), each rounded to a multiple (not below size)."""
    scale = max(size / h, size / w)

    def side(x: float) -> int:
        y = round(x / multiple) * multiple
        return y if y >= size else int(np.ceil(x / multiple) * multiple)

    return side(scale * h), side(scale * w)


# ---------------------------------------------------------------- config from shapes
def config_from_shapes(sd: dict[str, torch.Tensor], path: Path):
    from transformers import DepthAnythingConfig, Dinov2Config

    hidden = sd["backbone.embeddings.cls_token"].shape[-1]
    patch = sd["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((sd["backbone.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k)))
    swiglu = any(".mlp.weights_in." in k for k in sd)
    mlp_out = sd["backbone.encoder.layer.0.mlp.weights_in.weight" if swiglu else
                 "backbone.encoder.layer.0.mlp.fc1.weight"].shape[0]
    backbone = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_DIM),
        mlp_ratio=4 if swiglu else mlp_out // hidden, use_swiglu_ffn=swiglu, image_size=grid * patch,
        patch_size=patch, out_indices=out_indices(layers), reshape_hidden_states=False)
    neck = [sd[f"neck.reassemble_stage.layers.{i}.projection.weight"].shape[0] for i in range(4)]
    return DepthAnythingConfig(
        backbone_config=backbone, patch_size=patch, reassemble_hidden_size=hidden, neck_hidden_sizes=neck,
        fusion_hidden_size=sd["neck.convs.0.weight"].shape[0], head_hidden_size=sd["head.conv2.weight"].shape[0],
        depth_estimation_type="relative")


def out_indices(layers: int) -> list[int]:
    """The DINOv2 blocks (1-based) V2's DPT head reads: [3, 6, 9, 12] for S/B, [5, 12, 18, 24] for L."""
    if layers == 24:
        return [5, 12, 18, 24]
    return [max(1, layers * k // 4) for k in range(1, 5)]


# ---------------------------------------------------------------- key conversion
_ORIGINAL = (  # original repository prefix -> transformers prefix (first match wins)
    ("pretrained.cls_token", "backbone.embeddings.cls_token"),
    ("pretrained.mask_token", "backbone.embeddings.mask_token"),
    ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
    ("pretrained.patch_embed.proj.", "backbone.embeddings.patch_embeddings.projection."),
    ("pretrained.norm.", "backbone.layernorm."),
    ("pretrained.blocks.", "backbone.encoder.layer."),
    ("depth_head.projects.", "neck.reassemble_stage.layers.{}.projection."),
    ("depth_head.resize_layers.", "neck.reassemble_stage.layers.{}.resize."),
    ("depth_head.scratch.output_conv1.", "head.conv1."),
    ("depth_head.scratch.output_conv2.0.", "head.conv2."),
    ("depth_head.scratch.output_conv2.2.", "head.conv3."),
)
_BLOCK = (("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
          ("attn.proj.", "attention.output.dense."), ("mlp.w12.", "mlp.weights_in."),
          ("mlp.w3.", "mlp.weights_out."))


def to_transformers_keys(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint under transformers' key names (a transformers checkpoint passes through)."""
    if "backbone.embeddings.cls_token" in sd:
        return dict(sd)
    if "pretrained.cls_token" not in sd or not any(k.startswith("depth_head.") for k in sd):
        raise api.InvalidParams(
            f"Annotator file {path} is not a Depth Anything V2 checkpoint (no 'pretrained.cls_token' and "
            "'depth_head.*' keys, nor transformers' 'backbone.embeddings.*'); use depth_anything_v2_vits.pth "
            "from the Depth-Anything-V2 release (or its safetensors copy)")
    return renamed_vit_state(sd, "pretrained.blocks.", "backbone.encoder.layer.", _original_key)


def _original_key(key: str) -> str | None:
    if (neck := dpt_neck_key(key, "depth_head.scratch.")) is not None:
        return neck
    for old, new in _ORIGINAL:
        if key.startswith(old):
            rest = key[len(old):]
            if "{}" in new:  # projects.<i>.weight -> layers.<i>.projection.weight
                index, rest = rest.split(".", 1)
                new = new.format(index)
            if new.startswith("backbone.encoder.layer."):
                for a, b in _BLOCK:
                    rest = rest.replace(a, b)
            return new + rest
    return None  # unused extras (e.g. a DPT readout projection when use_clstoken is off)


_ATTENTION = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
              "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def attention_names(sd: dict[str, torch.Tensor], wanted) -> dict[str, torch.Tensor]:
    """Rename attention weights to the names this transformers version uses (query/key/value or q/k/v_proj)."""
    wanted = set(wanted)
    out = {}
    for key, value in sd.items():
        if key not in wanted:
            for old, new in _ATTENTION.items():
                for a, b in ((old, new), (new, old)):
                    if a in key and key.replace(a, b) in wanted:
                        key = key.replace(a, b)
        out[key] = value
    return out
