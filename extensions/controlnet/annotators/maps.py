"""Shared steps of the edge and line annotators: padding to 64, the "safe" quantisation, uint8 maps."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch


def pad64(rgb: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Pad HxWxC to multiples of 64 by repeating the last row and column (as sd-webui-controlnet
    does before a network), with the crop that undoes it."""
    h, w = rgb.shape[:2]
    padded = np.pad(rgb, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return padded, lambda x: np.ascontiguousarray(x[:h, :w])


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantise a 0..1 map to `step` + 1 levels (the "safe" preprocessors' step)."""
    return (x.astype(np.float32) * float(step + 1)).astype(np.int32).astype(np.float32) / float(step)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """A 0..1 map as uint8 (truncated, as the reference annotators do), three channels."""
    gray = (x * 255.0).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 1x3xHxW, values 0..255."""
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).float().permute(2, 0, 1)[None]


def need(sd: Mapping[str, torch.Tensor], key: str, model: str) -> torch.Tensor:
    """`sd[key]`, or a KeyError that says which architecture the file was expected to hold."""
    if key not in sd:
        raise KeyError(f"{key!r} is missing: the file is not a {model} state dict")
    return sd[key]


def count(sd: Mapping[str, torch.Tensor], pattern: str, start: int = 0) -> int:
    """How many consecutive indices i (from `start`) have `pattern.format(i)` in `sd`."""
    i = start
    while pattern.format(i) in sd:
        i += 1
    return i - start


def edge_runner(net, safe: bool) -> Callable[..., np.ndarray]:
    """The runner of an edge network (`net.edges(rgb) -> HxW in 0..1`): checked once on a blank image,
    so shape mismatches surface while the file is loaded; padded to 64 px, "safe" quantised if asked."""
    net.edges(np.zeros((64, 64, 3), np.uint8))

    def run(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
        padded, crop = pad64(img[..., :3])
        edge = net.edges(padded)
        return crop(to_uint8(safe_step(edge) if safe else edge))
    return run
