"""ESRGAN (RRDBNet) in its three published key layouts, and Real-ESRGAN's pixel-unshuffle variants.

Layouts (all mapped onto BasicSR's names, which this module's network uses):
- old ESRGAN: `model.0` (first conv), `model.1.sub.N.RDBk.convj.0` (blocks), `model.1.sub.<nb>` (trunk
  conv), then per 2x upsample a conv at `model.3`, `model.6`, ..., and the two HR convs last;
- xinntao's ESRGAN repo: `conv_first`, `RRDB_trunk.N.RDBk.convj`, `trunk_conv`, `upconvK`, `HRconv`;
- BasicSR / Real-ESRGAN: `conv_first`, `body.N.rdbk.convj`, `conv_body`, `conv_upK`, `conv_hr`, `conv_last`.

Real-ESRGAN x2plus (and 1x models) pixel-unshuffle the input before the first conv: its input
channels are 4x (or 16x) the output channels. Scale = 2 ** upsample convs / unshuffle factor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError

_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_TRUNK_BLOCK = re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$")
_NEW_BLOCK = re.compile(r"^body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$")


@dataclass(frozen=True)
class RRDBConfig:
    in_ch: int
    out_ch: int
    num_feat: int
    num_block: int
    num_grow_ch: int
    num_upsample: int
    unshuffle: int  # 1, 2 or 4

    @property
    def scale(self) -> int:
        return 2 ** self.num_upsample // self.unshuffle


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: RRDB trunk, nearest 2x upsample + conv per octave, two HR convs."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.conv_first = nn.Conv2d(c.in_ch * c.unshuffle ** 2, c.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(c.num_feat, c.num_grow_ch) for _ in range(c.num_block)))
        self.conv_body = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        for k in range(1, c.num_upsample + 1):
            self.add_module(f"conv_up{k}", nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(c.num_feat, c.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(c.num_feat, c.out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.config.unshuffle
        if f > 1 and (x.shape[2] % f or x.shape[3] % f):  # reflect-pad to the factor, crop the output back
            h, w = x.shape[2:]
            padded = F.pad(x, (0, -w % f, 0, -h % f), mode="reflect")
            return self.forward(padded)[:, :, : h * self.config.scale, : w * self.config.scale]
        if f > 1:
            x = F.pixel_unshuffle(x, f)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, self.config.num_upsample + 1):
            conv = getattr(self, f"conv_up{k}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def is_esrgan(keys: set[str]) -> bool:
    return ("model.0.weight" in keys and any(k.startswith("model.1.sub.") for k in keys)) or (
        "conv_first.weight" in keys and ("body.0.rdb1.conv1.weight" in keys or "RRDB_trunk.0.RDB1.conv1.weight" in keys))


def _from_old(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old `model.N` keys -> BasicSR names; the Sequential indices after the trunk are in order."""
    out: dict[str, torch.Tensor] = {}
    blocks = {int(m.group(1)) for k in sd if (m := _OLD_BLOCK.match(k))}
    nb = max(blocks) + 1 if blocks else 0
    tail = sorted({int(k.split(".")[1]) for k in sd if re.match(r"^model\.\d+\.weight$", k)} - {0})
    if len(tail) < 2:
        raise CheckpointError("ESRGAN (old layout) needs at least the two HR convs after the trunk")
    names = [f"conv_up{i + 1}" for i in range(len(tail) - 2)] + ["conv_hr", "conv_last"]
    index_names = dict(zip(tail, names, strict=True))
    for key, value in sd.items():
        if m := _OLD_BLOCK.match(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif key.startswith(f"model.1.sub.{nb}."):
            out["conv_body." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.0."):
            out["conv_first." + key.rsplit(".", 1)[1]] = value
        elif (m := re.match(r"^model\.(\d+)\.(weight|bias)$", key)) and int(m.group(1)) in index_names:
            out[f"{index_names[int(m.group(1))]}.{m.group(2)}"] = value
        else:
            raise CheckpointError(f"ESRGAN (old layout): unexpected key {key!r}")
    return out


def _from_trunk(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {"trunk_conv": "conv_body", "HRconv": "conv_hr", "upconv1": "conv_up1", "upconv2": "conv_up2"}
    out = {}
    for key, value in sd.items():
        if m := _TRUNK_BLOCK.match(key):
            key = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        else:
            head, _, kind = key.rpartition(".")
            key = f"{renames.get(head, head)}.{kind}"
        out[key] = value
    return out


def to_basicsr(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any of the three layouts -> BasicSR key names."""
    if "model.0.weight" in sd:
        return _from_old(sd)
    if "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        return _from_trunk(sd)
    return dict(sd)


def config_from(sd: dict[str, torch.Tensor]) -> RRDBConfig:
    """Sizes and scale from the (BasicSR-named) weights' shapes."""
    first, last = sd["conv_first.weight"], sd["conv_last.weight"]
    out_ch, first_in = last.shape[0], first.shape[1]
    unshuffle = next((f for f in (1, 2, 4) if first_in == out_ch * f * f), None)
    if unshuffle is None:
        raise CheckpointError(f"ESRGAN: first conv takes {first_in} channels for {out_ch} output channels; "
                              "expected 1x, 4x (pixel-unshuffle 2) or 16x (pixel-unshuffle 4)")
    blocks = {int(m.group(1)) for k in sd if (m := _NEW_BLOCK.match(k))}
    num_upsample = sum(1 for k in sd if re.match(r"^conv_up\d+\.weight$", k))
    return RRDBConfig(in_ch=first_in // unshuffle ** 2, out_ch=out_ch, num_feat=first.shape[0],
                      num_block=max(blocks) + 1 if blocks else 0,
                      num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0] if blocks else 32,
                      num_upsample=num_upsample, unshuffle=unshuffle)


def build(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, int, str]:
    """(network with the weights loaded, scale, layout label) for an ESRGAN state dict."""
    layout = "ESRGAN (old layout)" if "model.0.weight" in sd else "ESRGAN"
    weights = to_basicsr(sd)
    config = config_from(weights)
    net = RRDBNet(config)
    net.load_state_dict(weights, strict=True)
    label = "Real-ESRGAN" if config.unshuffle > 1 else layout
    return net, config.scale, label
