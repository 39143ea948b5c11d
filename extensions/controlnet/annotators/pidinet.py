"""softedge_pidinet: PiDiNet (Su et al., "Pixel Difference Networks for Efficient Edge Detection"),
the table-5 model (table5_pidinet.pth: "carv4" pixel-difference layout, dilation module, attention).

The checkpoint holds the trained pixel-difference kernels. As the original's conversion does, they
are turned into vanilla kernels once at load: a central difference (cd) subtracts the kernel's sum at
its centre, an angular difference (ad) subtracts the kernel rotated one step clockwise, and a radial
difference (rd) becomes a 5x5 kernel (outer ring +w, inner ring -w). Input is BGR in 0..1; the output
is the sigmoid of the classifier over the four side outputs. Widths are read from the weight shapes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import Runner, read_tensors
from .maps import edge_runner, image_tensor, need

MODEL = "PiDiNet (softedge_pidinet, table5_pidinet.pth)"
STAGES = (("block1_1", "block1_2", "block1_3"), ("block2_1", "block2_2", "block2_3", "block2_4"),
          ("block3_1", "block3_2", "block3_3", "block3_4"), ("block4_1", "block4_2", "block4_3", "block4_4"))
CARV4 = ("cd", "ad", "rd", "cv") * 4  # the pixel-difference type of init_block, then of each block in order
DILATIONS = (5, 7, 9, 11)  # the dilation module's four branches
_CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]  # 3x3 positions, each taking its clockwise neighbour's weight
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]  # 5x5 positions of the 8 non-centre 3x3 taps, two steps out
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]  # and one step out


def vanilla(w: torch.Tensor, pdc: str) -> torch.Tensor:
    """The plain convolution kernel equal to pixel-difference kernel `w` of type `pdc`."""
    w = w.float()
    if pdc == "cv" or w.shape[-1] == 5:  # a plain kernel, or an rd kernel already converted
        return w
    if w.shape[-2:] != (3, 3):
        raise ValueError(f"a pixel-difference kernel must be 3x3, not {tuple(w.shape)}")
    flat = w.reshape(*w.shape[:2], 9)
    if pdc == "cd":
        out = flat.clone()
        out[..., 4] -= flat.sum(-1)
        return out.reshape(w.shape)
    if pdc == "ad":
        return (flat - flat[..., _CLOCKWISE]).reshape(w.shape)
    ring = torch.zeros(*w.shape[:2], 25)
    ring[..., _RD_OUTER] = flat[..., 1:]  # taps 1..8 (the original drops tap 0 and keeps the centre)
    ring[..., _RD_INNER] = -flat[..., 1:]
    return ring.reshape(*w.shape[:2], 5, 5)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, groups: int = 1,
          dilation: int = 1) -> torch.Tensor:
    return F.conv2d(x, w, b, padding=dilation * (w.shape[-1] // 2), dilation=dilation, groups=groups)


class PiDiNet:
    """The converted network over a state dict in the original key layout ("module." stripped)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = {k: v.float() for k, v in sd.items()}
        get, opt = self.get, self.sd.get
        self.init = vanilla(get("init_block.weight"), CARV4[0])
        self.blocks = {name: (vanilla(get(f"{name}.conv1.weight"), pdc), get(f"{name}.conv2.weight"),
                              opt(f"{name}.shortcut.weight"), opt(f"{name}.shortcut.bias"))
                       for name, pdc in zip((n for s in STAGES for n in s), CARV4[1:], strict=True)}

    def get(self, key: str) -> torch.Tensor:
        return need(self.sd, key, MODEL)

    def _block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        dw, pw, shortcut, shortcut_bias = self.blocks[name]
        if shortcut is not None:  # the first block of stages 2-4 halves the size
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = F.conv2d(F.relu(_conv(x, dw, groups=x.shape[1])), pw)
        return y + (F.conv2d(x, shortcut, shortcut_bias) if shortcut is not None else x)

    def _side(self, i: int, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        get = self.get
        d = _conv(F.relu(x), get(f"dilations.{i}.conv1.weight"), get(f"dilations.{i}.conv1.bias"))
        d = sum(_conv(d, get(f"dilations.{i}.conv2_{k}.weight"), dilation=r) for k, r in enumerate(DILATIONS, 1))
        a = _conv(F.relu(d), get(f"attentions.{i}.conv1.weight"), get(f"attentions.{i}.conv1.bias"))
        d = d * torch.sigmoid(_conv(a, get(f"attentions.{i}.conv2.weight")))
        e = _conv(d, get(f"conv_reduces.{i}.conv.weight"), get(f"conv_reduces.{i}.conv.bias"))
        return F.interpolate(e, size=size, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def edges(self, rgb: np.ndarray) -> np.ndarray:
        """The fused edge map (float32 HxW in 0..1) of uint8 HxWx3."""
        x = image_tensor(rgb[..., ::-1]) / 255.0
        size = x.shape[2:]
        x = _conv(x, self.init)
        sides = []
        for i, stage in enumerate(STAGES):
            for name in stage:
                x = self._block(name, x)
            sides.append(self._side(i, x, size))
        fused = F.conv2d(torch.cat(sides, 1), self.get("classifier.weight"), self.get("classifier.bias"))
        return torch.sigmoid(fused)[0, 0].numpy()


def build(path: Path, safe: bool = False) -> Runner:
    return edge_runner(PiDiNet(read_tensors(path)), safe)


def build_safe(path: Path) -> Runner:
    return build(path, safe=True)
