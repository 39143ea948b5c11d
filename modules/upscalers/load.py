"""Upscaler model files -> networks: safe reading, architecture and scale from the keys.

Files are read by `modules.checkpoints.read.read_state_dict`: `.safetensors`, or `.pth` through
`torch.load(weights_only=True)` only (a pickle that needs code is refused, never run).
ESRGAN (all layouts), Real-ESRGAN, the compact SRVGG, SPAN, OmniSR, DAT, HAT and SwinIR run on
Atelier's own networks (`ARCHITECTURES`); any other architecture (Swin2SR, DRCT, ...) is handed to
the optional `spandrel` package when it is installed and importable.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.checkpoints.read import read_state_dict
from modules.errors import CheckpointError
from modules.upscalers import dat, esrgan, hat, omnisr, span, srvgg, swinir

log = logging.getLogger(__name__)
Builder = Callable[[dict[str, torch.Tensor]], tuple[nn.Module, int, str]]


@dataclass(frozen=True)
class UpscalerNet:
    """A loaded upscaling network: image tensor (1, C, h, w) in [0, 1] -> (1, C, h*scale, w*scale)."""

    net: nn.Module
    scale: int
    architecture: str
    path: Path


def spandrel_loader() -> Any | None:
    """spandrel's ModelLoader, or None when spandrel (or the torchvision it imports) is unusable."""
    try:
        import spandrel
    except Exception as err:  # ImportError, or torchvision failing to load its operators
        log.debug("spandrel unavailable: %s", err)
        return None
    return spandrel.ModelLoader()


# Atelier's own architectures: (detector on the key set, builder), tried in order; append new families.
ARCHITECTURES: tuple[tuple[Callable[[set[str]], bool], Builder], ...] = (
    (esrgan.is_esrgan, esrgan.build),
    (srvgg.is_srvgg, srvgg.build),
    (span.is_span, span.build),
    (omnisr.is_omnisr, omnisr.build),
    (dat.is_dat, dat.build),
    (hat.is_hat, hat.build),
    (swinir.is_swinir, swinir.build),
)


def build_network(sd: dict[str, torch.Tensor], path: Path) -> UpscalerNet:
    """The network for a state dict; raises CheckpointError naming the file when it is not an upscaler."""
    keys = set(sd)
    builder = next((build for detect, build in ARCHITECTURES if detect(keys)), None)
    if builder is not None:
        try:
            net, scale, arch = builder(sd)
        except (RuntimeError, KeyError, ValueError) as err:  # shapes that do not fit the detected layout
            raise CheckpointError(f"Upscaler model {path.name}: the weights do not fit the detected "
                                  f"architecture ({type(err).__name__}: {str(err)[:300]})") from err
        except CheckpointError as err:
            raise CheckpointError(f"Upscaler model {path.name}: {err}") from err
        return UpscalerNet(net.eval().requires_grad_(False), scale, arch, path)
    loader = spandrel_loader()
    if loader is None:
        raise CheckpointError(
            f"Upscaler model {path.name} is not ESRGAN, Real-ESRGAN, SRVGG, SPAN, OmniSR, DAT, HAT or SwinIR. "
            "Other architectures (Swin2SR, DRCT, ...) need the optional package spandrel with a working "
            "torchvision (pip install spandrel).")
    try:
        descriptor = loader.load_from_state_dict(sd)
    except Exception as err:  # spandrel raises its own UnsupportedModelError and shape errors
        raise CheckpointError(f"Upscaler model {path.name}: architecture not recognised "
                              f"({type(err).__name__}: {str(err)[:200]})") from err
    return UpscalerNet(descriptor.model.eval().requires_grad_(False), int(descriptor.scale),
                       str(descriptor.architecture.name), path)


def load_upscaler(path: Path) -> UpscalerNet:
    """Read and build an upscaler file; CheckpointError (with the file name and the fix) on bad files."""
    path = Path(path)
    try:
        sd = read_state_dict(path)
    except CheckpointError as err:
        raise type(err)(str(err).replace("Checkpoint ", "Upscaler model ", 1)) from err
    return build_network(sd, path)
