"""DeepDanbooru (resnet_custom_v3), the tagger A1111 ships as `model-resnet_custom_v3.pt`.

The file is a torch state dict whose convolutions are named `n_Conv_0` .. `n_Conv_178` (the
layout of the TorchDeepDanbooru port) plus a `tags` list. It is read with
`torch.load(weights_only=True)`, never unpickled otherwise. The network is a bottleneck ResNet
with TensorFlow "SAME" padding, described below as data: which conv numbers form each block,
and each block's stride. Channel widths come from the weights, so any width loads.
Input: (N, H, W, 3) RGB in [0, 1] (A1111 feeds 512x512); output: (N, tags) probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.errors import CheckpointError

FILE_NAME = "model-resnet_custom_v3.pt"
INPUT_SIZE = 512
HEAD = 178  # the 1x1 classifier conv (no bias), then global average pooling and a sigmoid


@dataclass(frozen=True)
class Block:
    """One bottleneck: 1x1 `reduce`, 3x3 (with `stride`), 1x1 `expand`; `shortcut` is a 1x1
    projection conv number (None: identity). The sum goes through a ReLU."""

    reduce: int
    stride: int = 1
    shortcut: int | None = None


def _identity_blocks(first: int, count: int) -> list[Block]:
    return [Block(first + 3 * i) for i in range(count)]


def blocks() -> list[Block]:
    """The blocks of resnet_custom_v3 in order. The first block of a stage numbers its projection
    before its own convs; the stride-2 block in the middle of stage 3 numbers it after them."""
    layout = [Block(2, 1, shortcut=1), *_identity_blocks(5, 2)]  # stage 1 (64 -> 256)
    layout += [Block(12, 2, shortcut=11), *_identity_blocks(15, 7)]  # stage 2 (512)
    layout += [Block(37, 2, shortcut=36), *_identity_blocks(40, 19)]  # stage 3 (1024) ...
    layout += [Block(97, 2, shortcut=100), *_identity_blocks(101, 19)]  # ... halved again mid-stage
    layout += [Block(159, 2, shortcut=158), *_identity_blocks(162, 2)]  # stage 4 (2048)
    layout += [Block(169, 2, shortcut=168), *_identity_blocks(172, 2)]  # stage 5 (4096)
    return layout


def _conv(sd: dict[str, torch.Tensor], index: int, stride: int = 1) -> nn.Conv2d:
    name = f"n_Conv_{index}"
    if f"{name}.weight" not in sd:
        raise CheckpointError(f"DeepDanbooru model: {name}.weight is missing (not a resnet_custom_v3 file)")
    weight = sd[f"{name}.weight"]
    if weight.ndim != 4:
        raise CheckpointError(f"DeepDanbooru model: {name}.weight has shape {tuple(weight.shape)}, expected 4-D")
    out_ch, in_ch, kh, kw = weight.shape
    conv = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=stride, bias=f"{name}.bias" in sd)
    return conv


class DeepDanbooruNet(nn.Module):
    """resnet_custom_v3, built from a state dict's shapes; `state_dict()` keys match the file's."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layout = blocks()
        convs = {0: _conv(sd, 0, 2), HEAD: _conv(sd, HEAD)}
        for block in self.layout:
            convs[block.reduce] = _conv(sd, block.reduce)
            convs[block.reduce + 1] = _conv(sd, block.reduce + 1, block.stride)
            convs[block.reduce + 2] = _conv(sd, block.reduce + 2)
            if block.shortcut is not None:
                convs[block.shortcut] = _conv(sd, block.shortcut, block.stride)
        for index in sorted(convs):
            self.add_module(f"n_Conv_{index}", convs[index])

    def conv(self, index: int) -> nn.Conv2d:
        return getattr(self, f"n_Conv_{index}")

    def _block(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        skip = x if block.shortcut is None else self.conv(block.shortcut)(x)
        h = F.relu(self.conv(block.reduce)(x))
        # TF "SAME" for a 3x3 conv on even sizes: (1, 1) at stride 1, (0, 1) at stride 2
        h = F.pad(h, [1, 1, 1, 1] if block.stride == 1 else [0, 1, 0, 1])
        h = F.relu(self.conv(block.reduce + 1)(h))
        return F.relu(self.conv(block.reduce + 2)(h) + skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = F.relu(self.conv(0)(F.pad(x, [2, 3, 2, 3])))
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)
        for block in self.layout:
            x = self._block(x, block)
        x = self.conv(HEAD)(x)
        return torch.sigmoid(x.mean(dim=(2, 3)))


@dataclass
class DeepDanbooru:
    net: DeepDanbooruNet
    tags: list[str]

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) in [0, 1] -> (N, tags)."""
        param = next(self.net.parameters())
        return self.net(pixels.to(param.device, param.dtype)).float().cpu()


def load_deepdanbooru(path: Path) -> DeepDanbooru:
    """Read a resnet_custom_v3 file (weights only) into the network; CheckpointError naming the file."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (code in the pickle), truncated zip, not a torch file
        raise CheckpointError(f"DeepDanbooru model {path.name} cannot be read as weights only "
                              f"({type(err).__name__}: {str(err)[:200]}). Use the original "
                              f"{FILE_NAME}.") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"DeepDanbooru model {path.name} does not hold a state dict")
    tags = sd.pop("tags", None)
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise CheckpointError(f"DeepDanbooru model {path.name} has no list of tags (the 'tags' entry)")
    net = DeepDanbooruNet(sd)
    try:
        net.load_state_dict(sd)
    except RuntimeError as err:
        raise CheckpointError(f"DeepDanbooru model {path.name}: the weights do not fit resnet_custom_v3 "
                              f"({str(err)[:300]})") from None
    if net.conv(HEAD).out_channels != len(tags):
        raise CheckpointError(f"DeepDanbooru model {path.name}: {net.conv(HEAD).out_channels} outputs but "
                              f"{len(tags)} tags")
    return DeepDanbooru(net.eval().requires_grad_(False), list(tags))
