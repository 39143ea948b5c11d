"""softedge_hed: lllyasviel's Apache-2.0 HED ("ControlNetHED_Apache2", file ControlNetHED.pth).

The network is a VGG-like stack of blocks (`blockN.convs.K`, 3x3 convolutions with ReLU, a 2x2 max
pool before every block but the first), each with a 1x1 `blockN.projection` to one edge logit map.
It takes RGB 0..255 minus the learnt `norm`. The maps are scaled back to the image size (bilinear),
averaged and passed through a sigmoid. Widths and depths are read from the weight shapes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import Runner, read_tensors
from .maps import count, edge_runner, image_tensor, need

MODEL = "ControlNetHED_Apache2 (softedge_hed)"
Block = tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


class HED:
    """The HED network over a state dict in the original key layout."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.norm = need(sd, "norm", MODEL).reshape(1, -1, 1, 1).float()
        blocks = count(sd, "block{}.projection.weight", start=1)
        if blocks == 0:
            need(sd, "block1.projection.weight", MODEL)
        self.blocks: list[Block] = []
        for n in range(1, blocks + 1):
            layers = max(1, count(sd, f"block{n}.convs.{{}}.weight"))
            convs = [_conv(sd, f"block{n}.convs.{k}") for k in range(layers)]
            self.blocks.append((convs, _conv(sd, f"block{n}.projection")))

    @torch.inference_mode()
    def logits(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The per-block edge logits of uint8 HxWx3, each scaled back to HxW."""
        x = image_tensor(rgb)
        size = x.shape[2:]
        h = x - self.norm
        maps = []
        for n, (convs, (pw, pb)) in enumerate(self.blocks):
            if n:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            for w, b in convs:
                h = F.relu(F.conv2d(h, w, b, padding=1))
            edge = F.conv2d(h, pw, pb)
            maps.append(F.interpolate(edge, size=size, mode="bilinear", align_corners=False)[0, 0].numpy())
        return maps

    def edges(self, rgb: np.ndarray) -> np.ndarray:
        """The soft edge map (float64 HxW in 0..1)."""
        mean = np.mean(np.stack(self.logits(rgb), axis=2), axis=2).astype(np.float64)
        return 1 / (1 + np.exp(-mean))


def _conv(sd: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return need(sd, f"{name}.weight", MODEL).float(), need(sd, f"{name}.bias", MODEL).float()


def build(path: Path, safe: bool = False) -> Runner:
    return edge_runner(HED(read_tensors(path)), safe)


def build_safe(path: Path) -> Runner:
    return build(path, safe=True)
