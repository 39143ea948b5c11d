"""Line and scribble maps derived from images or from the soft-edge networks, as sd-webui-controlnet:

- `lineart_standard` (no weights): the image's difference from its Gaussian blur (sigma 6), the
  darkest channel, normalised by the median of the values above 8 (at least 16) times 127;
- `scribble_hed` / `scribble_pidinet`: the soft-edge map (uint8) thinned by non-maximum suppression
  (blur sigma 3, a pixel kept where it is the maximum of its 3-pixel line in any of four directions
  and over 127), blurred again (sigma 3) and every value over 4 made white;
- `t2ia_sketch_pidi`: the PiDiNet map thresholded at 0.5.
Blurs follow OpenCV's GaussianBlur: kernel 8 sigma + 1 taps for float and 6 sigma + 1 for uint8
input (odd), mirrored edges (reflect-101), uint8 results rounded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import Runner, read_tensors
from .hed import HED
from .maps import pad64, to_uint8
from .pidinet import PiDiNet

NMS_THRESHOLD, SCRIBBLE_SIGMA, SCRIBBLE_FLOOR = 127, 3.0, 4
# the four 3-pixel lines through a pixel: horizontal, vertical and the two diagonals
LINES = (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1)))


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's GaussianBlur(x, (0, 0), sigma) of an HxW or HxWxC uint8 or float array."""
    is_uint8 = x.dtype == np.uint8
    taps = int(round(sigma * (6 if is_uint8 else 8) + 1)) | 1
    radius = taps // 2
    k = torch.exp(-0.5 * ((torch.arange(taps, dtype=torch.float64) - radius) / sigma) ** 2)
    k = (k / k.sum()).float()
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[:, None]
    mode = "reflect" if min(x.shape[:2]) > radius else "replicate"
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))
    out = t[:, 0].permute(1, 2, 0).numpy()
    out = out[..., 0] if x.ndim == 2 else out
    return out.round().clip(0, 255).astype(np.uint8) if is_uint8 else out


def lineart_standard(rgb: np.ndarray) -> np.ndarray:
    """Dark lines of the image as white on black (uint8 HxWx3)."""
    padded, crop = pad64(rgb[..., :3])
    x = padded.astype(np.float32)
    intensity = np.min(gaussian_blur(x, 6.0) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(strong)) if strong.size else 0.0) * 127
    return crop(np.repeat(intensity.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))


def nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """White where the blurred map is a maximum along any of the four lines and over `threshold`."""
    x = gaussian_blur(x.astype(np.float32), sigma)
    padded = np.pad(x, 1, constant_values=-np.inf)
    h, w = x.shape
    keep = np.zeros(x.shape, bool)
    for (dy1, dx1), (dy2, dx2) in LINES:
        a = padded[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        b = padded[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (x >= a) & (x >= b)
    return np.where(keep & (x > threshold), 255, 0).astype(np.uint8)


def scribble(edges: np.ndarray) -> np.ndarray:
    """A uint8 HxW soft-edge map as thin white scribbles (uint8 HxWx3)."""
    lines = gaussian_blur(nms(edges, NMS_THRESHOLD, SCRIBBLE_SIGMA), SCRIBBLE_SIGMA)
    return np.repeat(np.where(lines > SCRIBBLE_FLOOR, 255, 0).astype(np.uint8)[..., None], 3, axis=2)


def _runner(edges, finish) -> Runner:
    """A runner applying `finish` to the network's 0..1 edge map (of the image padded to 64, cropped back)."""
    def run(img: np.ndarray, res: int, a: float, b: float, seed: int) -> np.ndarray:
        padded, crop = pad64(img[..., :3])
        return finish(crop(edges(padded)))
    return run


def build_scribble_hed(path: Path) -> Runner:
    net = HED(read_tensors(path))
    net.edges(np.zeros((64, 64, 3), np.uint8))  # shape mismatches surface now, naming the file
    return _runner(net.edges, lambda e: scribble(to_uint8(e)[..., 0]))


def build_scribble_pidinet(path: Path) -> Runner:
    net = PiDiNet(read_tensors(path))
    net.edges(np.zeros((64, 64, 3), np.uint8))
    return _runner(net.edges, lambda e: scribble(to_uint8(e)[..., 0]))


def build_sketch_pidi(path: Path) -> Runner:
    net = PiDiNet(read_tensors(path))
    net.edges(np.zeros((64, 64, 3), np.uint8))
    return _runner(net.edges, lambda e: to_uint8((e > 0.5).astype(np.float32)))
