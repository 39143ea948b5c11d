"""lineart_realistic / lineart_coarse (sk_model.pth / sk_model2.pth): the line-drawing Generator of
"Learning to generate line drawings that convey geometry and semantics" (Chan et al.).

Keys `model0.1` (7x7 conv after a reflection pad of 3), `model1.0` and `model1.3` (stride-2 convs),
`model2.N.conv_block.1` and `.5` (residual blocks: reflection pad 1, 3x3 conv, instance norm),
`model3.0` and `model3.3` (stride-2 transposed convs) and `model4.1` (7x7 conv, sigmoid). Every conv
but the last is followed by an instance norm (no parameters) and a ReLU. Input is RGB in 0..1; the
drawing (black lines on white) is inverted to white lines on black, as sd-webui-controlnet does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import Runner, read_tensors
from .maps import count, image_tensor, need, pad64, to_uint8

MODEL = "line-drawing Generator (lineart_realistic / lineart_coarse)"
Conv = tuple[torch.Tensor, torch.Tensor]


def _conv(sd: dict[str, torch.Tensor], name: str, model: str = MODEL) -> Conv:
    return need(sd, f"{name}.weight", model).float(), need(sd, f"{name}.bias", model).float()


def _norm_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.instance_norm(x))


class LineGenerator:
    """The Generator over a state dict in the original key layout (any width, any residual count)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.first, self.last = _conv(sd, "model0.1"), _conv(sd, "model4.1")
        self.down = [_conv(sd, "model1.0"), _conv(sd, "model1.3")]
        self.up = [_conv(sd, "model3.0"), _conv(sd, "model3.3")]
        blocks = count(sd, "model2.{}.conv_block.1.weight")
        self.blocks = [(_conv(sd, f"model2.{n}.conv_block.1"), _conv(sd, f"model2.{n}.conv_block.5"))
                       for n in range(blocks)]

    @torch.inference_mode()
    def drawing(self, rgb: np.ndarray) -> np.ndarray:
        """The line drawing (float32 HxW, 1 = paper) of uint8 HxWx3."""
        h = _norm_relu(F.conv2d(F.pad(image_tensor(rgb) / 255.0, (3,) * 4, mode="reflect"), *self.first))
        for w, b in self.down:
            h = _norm_relu(F.conv2d(h, w, b, stride=2, padding=1))
        for (w1, b1), (w2, b2) in self.blocks:
            r = _norm_relu(F.conv2d(F.pad(h, (1,) * 4, mode="reflect"), w1, b1))
            h = h + F.instance_norm(F.conv2d(F.pad(r, (1,) * 4, mode="reflect"), w2, b2))
        for w, b in self.up:
            h = _norm_relu(F.conv_transpose2d(h, w, b, stride=2, padding=1, output_padding=1))
        return torch.sigmoid(F.conv2d(F.pad(h, (3,) * 4, mode="reflect"), *self.last))[0, 0].numpy()


def build(path: Path) -> Runner:
    net = LineGenerator(read_tensors(path))
    net.drawing(np.zeros((64, 64, 3), np.uint8))  # shape mismatches surface now, naming the file

    def run(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
        padded, crop = pad64(img[..., :3])
        return crop(255 - to_uint8(net.drawing(padded)))
    return run
