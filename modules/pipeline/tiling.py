"""Seamless tiling (A1111's "Tiling"): every 2-D convolution of the UNet and the VAE pads circularly
for the job, so the image wraps around at its edges; the previous padding modes come back afterwards."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _convolutions(*modules: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for module in modules if module is not None for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@contextmanager
def circular_padding(enabled: bool, *modules: torch.nn.Module) -> Iterator[None]:
    """Within the block, the convolutions of `modules` pad circularly (nothing changes when not `enabled`)."""
    if not enabled:
        yield
        return
    convs = _convolutions(*modules)
    before = [conv.padding_mode for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convs, before, strict=True):
            conv.padding_mode = mode
