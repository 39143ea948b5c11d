"""Real-ESRGAN's compact SRVGGNet (realesr-general-x4v3, realesr-animevideov3).

Keys `body.0` (first conv), `body.1` (PReLU weights), then conv/PReLU pairs, and the last conv
at `body.<2n+2>` with out_ch * scale² outputs, pixel-shuffled and added to the nearest-upsampled input.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError


class SRVGGNetCompact(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_feat: int, num_conv: int, scale: int, prelu: bool) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_ch, num_feat, 3, 1, 1), self._act(num_feat, prelu)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), self._act(num_feat, prelu)]
        layers.append(nn.Conv2d(num_feat, out_ch * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    @staticmethod
    def _act(num_feat: int, prelu: bool) -> nn.Module:
        return nn.PReLU(num_parameters=num_feat) if prelu else nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def is_srvgg(keys: set[str]) -> bool:
    return "body.0.weight" in keys and "body.0.rdb1.conv1.weight" not in keys and all(
        re.match(r"^body\.\d+\.(weight|bias)$", k) for k in keys)


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    convs = sorted(int(k.split(".")[1]) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4)
    if len(convs) < 2:
        raise CheckpointError("SRVGGNet: needs a first and a last conv")
    first, last = sd[f"body.{convs[0]}.weight"], sd[f"body.{convs[-1]}.weight"]
    in_ch, num_feat = first.shape[1], first.shape[0]
    scale = math.isqrt(last.shape[0] // in_ch)
    if scale * scale * in_ch != last.shape[0]:
        raise CheckpointError(f"SRVGGNet: last conv has {last.shape[0]} outputs, not {in_ch} x scale²")
    prelu = "body.1.weight" in sd
    net = SRVGGNetCompact(in_ch, in_ch, num_feat, len(convs) - 2, scale, prelu)
    net.load_state_dict(sd, strict=True)
    return net, scale, "Real-ESRGAN compact (SRVGG)"
