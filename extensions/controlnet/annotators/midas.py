"""MiDaS v3 DPT-Hybrid (`depth_midas`, `normal_midas`) through transformers' `DPTForDepthEstimation`.

The file is `dpt_hybrid-midas-501f0c75.pt` with the MiDaS repository's keys (`pretrained.model.*`, the
timm ViT-hybrid with its ResNet stem; `pretrained.act_postprocess*`; `scratch.*`), read with
`weights_only`; its keys are renamed to transformers' hybrid DPT (BiT backbone), whose config is read
from the tensor shapes. A transformers `dpt-hybrid-midas` state dict passes through.
As sd-webui-controlnet does: pixels to -1..1, edge padding to multiples of 64, depth min-max scaled to
0..255; the normal map is the Sobel gradient of the raw depth with z = 2*pi, zeroed where the scaled
depth is below the background threshold.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.plugins import api

from . import Runner
from .depth_anything import HEAD_DIM, attention_names
from .depth_common import dpt_neck_key, gray_to_rgb, load_weights, renamed_vit_state

PAD = 64
NORMAL_Z = 2 * math.pi
PATCH = 16  # the ResNet stem and three stages reduce by 16; the ViT's patch projection is 1x1


def build_depth(path: Path) -> Runner:
    model = load_model(path)

    def run(img: np.ndarray, resolution, a, b, seed) -> np.ndarray:
        scaled = _scaled(predict(model, img)).mul(255).clamp(0, 255).numpy().astype(np.uint8)
        return gray_to_rgb(crop_to(scaled, img.shape))

    return run


def build_normal(path: Path) -> Runner:
    model = load_model(path)

    def run(img: np.ndarray, resolution, a, b, seed) -> np.ndarray:
        return crop_to(normal_map(predict(model, img), background=float(a)), img.shape)

    return run


@torch.no_grad()
def predict(model, img: np.ndarray) -> torch.Tensor:
    """Raw MiDaS depth (HxW float32) of an RGB uint8 image, run edge-padded to multiples of 64."""
    h, w = img.shape[:2]
    padded = np.pad(img[..., :3], [[0, -h % PAD], [0, -w % PAD], [0, 0]], mode="edge")
    x = torch.from_numpy(np.ascontiguousarray(padded)).float().div(127.5).sub(1).permute(2, 0, 1)[None]
    return model(pixel_values=x).predicted_depth[0]  # padded size: the caller crops after scaling


def _scaled(depth: torch.Tensor) -> torch.Tensor:
    d = depth - depth.min()
    return d / d.max() if float(d.max()) > 0 else d


def crop_to(out: np.ndarray, img_shape) -> np.ndarray:
    return out[: img_shape[0], : img_shape[1]]


def normal_map(depth: torch.Tensor, background: float) -> np.ndarray:
    """RGB = (dx, dy, 2*pi) per pixel, unit length, mapped to 0..255; flat where scaled depth < background."""
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    d = F.pad(depth.float()[None, None], (1, 1, 1, 1), mode="reflect")  # OpenCV's default border
    dx = F.conv2d(d, sobel[None, None])[0, 0]
    dy = F.conv2d(d, sobel.T[None, None])[0, 0]
    flat = _scaled(depth) < background
    dx[flat] = 0
    dy[flat] = 0
    normal = torch.stack([dx, dy, torch.full_like(dx, NORMAL_Z)], dim=2)
    normal = normal / normal.pow(2).sum(dim=2, keepdim=True).sqrt()
    return (normal * 127.5 + 127.5).clamp(0, 255).numpy().astype(np.uint8)


def load_model(path: Path):
    from transformers import DPTForDepthEstimation

    tensors = to_transformers_keys(load_weights(path), path)
    with torch.device("meta"):
        model = DPTForDepthEstimation(config_from_shapes(tensors))
    tensors = attention_names(tensors, model.state_dict().keys())
    model.load_state_dict(tensors, strict=True, assign=True)
    any_size(model)
    return model.eval()


def any_size(model) -> None:
    """Let the hybrid DPT take any size, as MiDaS does: transformers' hybrid path checks the input against
    `image_size` and reshapes the neck's tokens as a square grid; resize the position embeddings
    and give the neck the grid (the ResNet's first stage is at 1/4 of the input, the tokens at 1/16)."""
    embeddings, neck = model.dpt.embeddings, model.neck
    embeddings.forward = functools.partial(type(embeddings).forward, embeddings, interpolate_pos_encoding=True)

    def neck_forward(hidden_states, patch_height=None, patch_width=None):
        h, w = hidden_states[0].shape[-2:]
        return type(neck).forward(neck, hidden_states, h // 4, w // 4)

    neck.forward = neck_forward


# ---------------------------------------------------------------- config from shapes
def _count(sd, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(pattern, k))), default=-1)


def config_from_shapes(sd: dict[str, torch.Tensor]):
    from transformers import BitConfig, DPTConfig

    bit = "dpt.embeddings.backbone.bit."
    stages = _count(sd, re.escape(bit) + r"encoder\.stages\.(\d+)\.")
    depths = [_count(sd, re.escape(f"{bit}encoder.stages.{s}.layers.") + r"(\d+)\.") for s in range(stages)]
    widths = [sd[f"{bit}encoder.stages.{s}.layers.0.conv3.weight"].shape[0] for s in range(stages)]
    backbone = BitConfig(global_padding="same", layer_type="bottleneck", depths=depths, hidden_sizes=widths,
                         embedding_size=sd[f"{bit}embedder.convolution.weight"].shape[0],
                         out_features=[f"stage{s + 1}" for s in range(stages)], embedding_dynamic_padding=True)
    hidden = sd["dpt.embeddings.cls_token"].shape[-1]
    layers = _count(sd, r"dpt\.encoder\.layer\.(\d+)\.")
    grid = round((sd["dpt.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    neck = [*widths[:2], *(sd[f"neck.reassemble_stage.layers.{i}.projection.weight"].shape[0] for i in (2, 3))]
    return DPTConfig(
        is_hybrid=True, backbone_config=backbone, backbone_featmap_shape=[1, widths[-1], grid, grid],
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_DIM),
        intermediate_size=sd["dpt.encoder.layer.0.intermediate.dense.weight"].shape[0], layer_norm_eps=1e-6,
        image_size=grid * PATCH, patch_size=PATCH, readout_type="project", reassemble_factors=[1, 1, 1, 0.5],
        backbone_out_indices=[layers // 4 - 1, layers // 2 - 1, 3 * layers // 4 - 1, layers - 1],
        neck_hidden_sizes=neck, fusion_hidden_size=sd["neck.convs.0.weight"].shape[0], use_auxiliary_head=False)


# ---------------------------------------------------------------- key conversion
_PREFIXES = (  # MiDaS prefix -> transformers prefix (first match wins)
    ("pretrained.model.patch_embed.backbone.stem.conv.", "dpt.embeddings.backbone.bit.embedder.convolution."),
    ("pretrained.model.patch_embed.backbone.stem.norm.", "dpt.embeddings.backbone.bit.embedder.norm."),
    ("pretrained.model.patch_embed.backbone.stages.", "dpt.embeddings.backbone.bit.encoder.stages."),
    ("pretrained.model.patch_embed.proj.", "dpt.embeddings.projection."),
    ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
    ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
    ("pretrained.model.norm.", "dpt.layernorm."),
    ("pretrained.model.blocks.", "dpt.encoder.layer."),
    ("scratch.output_conv.", "head.head."),
)
_VIT_BLOCK = (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.output.dense."),
              ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))


def to_transformers_keys(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    if "dpt.embeddings.cls_token" in sd:
        return {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}
    if "pretrained.model.patch_embed.backbone.stem.conv.weight" not in sd or "scratch.layer1_rn.weight" not in sd:
        raise api.InvalidParams(
            f"Annotator file {path} is not a MiDaS DPT-Hybrid checkpoint (no 'pretrained.model.patch_embed.backbone' "
            "and 'scratch.*' keys); use dpt_hybrid-midas-501f0c75.pt from the MiDaS v3 release")
    return renamed_vit_state(sd, "pretrained.model.blocks.", "dpt.encoder.layer.", _midas_key)


def _midas_key(key: str) -> str | None:
    if m := re.match(r"pretrained\.act_postprocess(\d)\.(\d)\.(.+)", key):
        stage, part, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        if part == "0":  # the readout projection (Linear + GELU)
            return f"neck.reassemble_stage.readout_projects.{stage}.{rest.removeprefix('project.')}"
        return f"neck.reassemble_stage.layers.{stage}.{'projection' if part == '3' else 'resize'}.{rest}"
    if (neck := dpt_neck_key(key, "scratch.")) is not None:
        return neck
    for old, new in _PREFIXES:
        if key.startswith(old):
            rest = key[len(old):]
            if new == "dpt.encoder.layer.":
                for a, b in _VIT_BLOCK:
                    rest = rest.replace(a, b)
            elif new.endswith("stages."):
                rest = re.sub(r"^(\d+)\.blocks\.", r"\1.layers.", rest)
            return new + rest
    return None  # the ViT's classifier head and other unused extras
