"""lineart_realistic / lineart_coarse (sk_model.pth / sk_model2.pth): the line-drawing Generator of
"Learning to generate line drawings that convey geometry and semantics" (Chan et al.).

Keys `model0.1` (7x7 conv after a reflection pad of 3), `model1.0` and `model1.3` (stride-2 convs),
`model2.N.conv_block.1` and `.5` (residual blocks: reflection pad 1, 3x3 conv, instance norm),
`model3.0` and `model3.3` (stride-2 transposed convs) and `model4.1` (7x7 conv, sigmoid). Every conv
but the last is followed by an instance norm (no parameters) and a ReLU. Input is RGB in 0..1; the
drawing (black lines on white) is inverted to white lines on black, as sd-webui-controlnet does.

lineart_anime (netG.pth) is a pix2pix U-Net generator (8 levels, instance norms); see `UNetLevel`.
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


# ---------------------------------------------------------------- lineart_anime (netG.pth)
ANIME = "U-Net generator (lineart_anime, netG.pth)"


class UNetLevel:
    """One level of the pix2pix U-Net: `model.model` (outermost: `.0` down, `.1` inner, `.3` up); below it
    `...model.1` down, `...model.3` inner and `...model.5` up, or, innermost, `.1` down and `.3` up.
    Instance norms have no parameters; convs are 4x4, stride 2, padding 1."""

    def __init__(self, sd: dict[str, torch.Tensor], prefix: str, outermost: bool = False) -> None:
        self.outermost = outermost
        inner = f"{prefix}.1" if outermost else f"{prefix}.3"
        has_inner = outermost or f"{inner}.model.1.weight" in sd
        self.down = _conv(sd, f"{prefix}.0" if outermost else f"{prefix}.1", ANIME)
        self.up = _conv(sd, f"{prefix}.5" if has_inner and not outermost else f"{prefix}.3", ANIME)
        self.inner = UNetLevel(sd, f"{inner}.model") if has_inner else None

    @property
    def depth(self) -> int:
        return 1 + (self.inner.depth if self.inner else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            h = self.inner(F.conv2d(x, *self.down, stride=2, padding=1))
            return torch.tanh(F.conv_transpose2d(F.relu(h), *self.up, stride=2, padding=1))
        h = F.conv2d(F.leaky_relu(x, 0.2), *self.down, stride=2, padding=1)
        if self.inner is not None:
            h = self.inner(F.instance_norm(h))
        up = F.instance_norm(F.conv_transpose2d(F.relu(h), *self.up, stride=2, padding=1))
        return torch.cat([x, up], 1)


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


class AnimeLines:
    """lineart_anime: the image is scaled (bicubic) to multiples of 256 (or of 2^depth if deeper), fed
    as -1..1, and the drawing scaled back."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.net = UNetLevel(sd, "model.model", outermost=True)
        self.unit = max(256, 2 ** self.net.depth)

    @torch.inference_mode()
    def drawing(self, rgb: np.ndarray) -> np.ndarray:
        """The line drawing (float32 HxW, 0..255, 255 = paper) of uint8 HxWx3."""
        h, w = rgb.shape[:2]
        size = (-(-h // self.unit) * self.unit, -(-w // self.unit) * self.unit)
        x = _bicubic(image_tensor(rgb), size).round().clamp(0, 255)  # the resized image is uint8 again
        line = self.net(x / 127.5 - 1.0)[:, :1] * 127.5 + 127.5
        return _bicubic(line, (h, w))[0, 0].numpy()


def build_anime(path: Path) -> Runner:
    net = AnimeLines(read_tensors(path))
    net.drawing(np.zeros((64, 64, 3), np.uint8))  # shape mismatches surface now, naming the file

    def run(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
        padded, crop = pad64(img[..., :3])
        gray = 255 - net.drawing(padded).clip(0, 255).astype(np.uint8)
        return crop(np.repeat(gray[..., None], 3, axis=2))
    return run
