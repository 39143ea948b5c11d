"""Face model files -> networks: safe reading, the architecture from the keys.

Files are read by `modules.checkpoints.read.read_state_dict` (`.safetensors`, or `.pth` through
`torch.load(weights_only=True)` only: a pickle that needs code is refused, never run). GFPGAN
v1.3/v1.4, CodeFormer, RestoreFormer / RestoreFormer++ and RetinaFace run on Atelier's own networks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.checkpoints.read import read_state_dict
from modules.errors import CheckpointError
from modules.faces import codeformer, gfpgan, restoreformer, retinaface


@dataclass(frozen=True)
class FaceNet:
    """A restoration network: `run(x, weight)` maps (1, 3, size, size) in [-1, 1] to the same."""

    net: nn.Module
    architecture: str  # "GFPGAN", "CodeFormer", "RestoreFormer", "RestoreFormer++"
    size: int
    path: Path
    run: Callable[[torch.Tensor, float], torch.Tensor]


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors under the first prefix any key has, without it (a training checkpoint's `vqvae.`
    network beside its loss modules; DataParallel's `module.`)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read(path: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(Path(path))
    except CheckpointError as err:
        raise type(err)(str(err).replace("Checkpoint ", f"{kind} model ", 1)) from err


def build_restorer(sd: dict[str, torch.Tensor], path: Path) -> FaceNet:
    """The restoration network for a state dict; CheckpointError naming the file otherwise."""
    sd = _strip(sd, ("module.", "vqvae."))
    keys = set(sd)
    try:
        if gfpgan.is_gfpgan(keys):
            net: Any = gfpgan.build(sd)
            size = 2 ** (len(net.conv_body_up) + 2)
            return FaceNet(net.eval().requires_grad_(False), "GFPGAN", size, path, lambda x, w: net(x))
        if codeformer.is_codeformer(keys):
            net = codeformer.build(sd)
            size = 32 * int(sd["position_emb"].shape[0] ** 0.5)
            return FaceNet(net.eval().requires_grad_(False), "CodeFormer", size, path, lambda x, w: net(x, w))
        if restoreformer.is_restoreformer(keys):
            net = restoreformer.build(sd)
            name = "RestoreFormer++" if restoreformer.is_plus_plus(sd) else "RestoreFormer"
            return FaceNet(net.eval().requires_grad_(False), name, 512, path, lambda x, w: net(x))  # trained at 512
    except (RuntimeError, KeyError, ValueError, IndexError) as err:  # shapes that do not fit the layout
        raise CheckpointError(f"Face model {path.name}: the weights do not fit the detected architecture "
                              f"({type(err).__name__}: {str(err)[:300]})") from err
    raise CheckpointError(f"Face model {path.name} is not GFPGAN (v1.3/v1.4, 'clean'), CodeFormer or "
                          "RestoreFormer(++): its keys match none of them.")


def load_restorer(path: Path) -> FaceNet:
    path = Path(path)
    return build_restorer(read(path, "Face"), path)


def load_detector(path: Path) -> retinaface.RetinaFace:
    path = Path(path)
    sd = _strip(read(path, "Face detection"), ("module.",))
    if not retinaface.is_retinaface(set(sd)):
        raise CheckpointError(f"Face detection model {path.name} is not RetinaFace (facexlib's "
                              "detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth).")
    try:
        return retinaface.build(sd).requires_grad_(False)
    except (RuntimeError, KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"Face detection model {path.name}: the weights do not fit RetinaFace "
                              f"({type(err).__name__}: {str(err)[:300]})") from err
