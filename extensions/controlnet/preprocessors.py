"""Preprocessors ("modules"): image -> control hint, as sd-webui-controlnet names them.

The built-in ones are algorithmic (no weights) and written here in numpy/torch: canny
(Sobel, non-maximum suppression, hysteresis, as OpenCV's Canny with L1 gradients), invert,
scribble (threshold, xdog), tile (resample, colorfix), blur, shuffle, color, binary and
inpaint_only. Weight-based ones (depth, pose, lineart, ...) are listed with the annotator file
they need and refused with a message naming it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .annotators import Annotators, Builder, depth_anything, hed, lineart, midas, pidinet
from .annotators.dwpose import build as build_dwpose
from .annotators.openpose import build as build_openpose
from .annotators.openpose_parts import build_face, build_faceonly, build_full, build_hand
from .annotators.sketch import build_scribble_hed, build_scribble_pidinet, build_sketch_pidi, lineart_standard


@dataclass(frozen=True)
class Slider:
    """A preprocessor slider as /controlnet/module_list details it."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1.0


@dataclass(frozen=True)
class Preprocessor:
    """`run(rgb uint8 HxWx3, resolution, a, b, seed) -> uint8 HxWxC` (C = 3, or 4 for inpaint's mask)."""

    name: str
    run: Callable[..., np.ndarray] | None
    tag: str  # the Control Type it belongs to ("Canny", "Scribble", ...)
    resolution: Slider | None = Slider("Preprocessor Resolution", 512, 64, 2048)
    a: Slider | None = None
    b: Slider | None = None
    aliases: tuple[str, ...] = ()
    annotator: str = ""  # the weights file a weight-based preprocessor needs in models/annotators
    uses_mask: bool = False
    build: Builder | None = None  # weight-based: builds the runner from the annotator file


# ---------------------------------------------------------------- helpers
def _gray(img: np.ndarray) -> np.ndarray:
    return (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def _hwc3(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


def _gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur (radius 3 sigma, replicated borders) of an HxW or HxWxC float image."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[:, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), kernel[None, None, None, :])
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), kernel[None, None, :, None])
    out = t[:, 0].permute(1, 2, 0).numpy()
    return out[..., 0] if img.ndim == 2 else out


def resize_short_side(img: np.ndarray, resolution: int) -> np.ndarray:
    """Resize so the short side is `resolution` (the preprocessors' working size)."""
    h, w = img.shape[:2]
    if resolution <= 0 or min(h, w) == resolution:
        return img
    k = resolution / min(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    method = Image.Resampling.LANCZOS if k < 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize(size, method))


# ---------------------------------------------------------------- algorithms
def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges: 3x3 Sobel, L1 magnitude, non-maximum suppression, hysteresis (OpenCV's defaults)."""
    g = torch.from_numpy(_gray(img))[None, None]
    sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(gp, sx[None, None])[0, 0]
    gy = F.conv2d(gp, sx.T[None, None])[0, 0]
    mag = gx.abs() + gy.abs()
    angle = (torch.rad2deg(torch.atan2(gy, gx)) + 180) % 180
    m = F.pad(mag[None, None], (1, 1, 1, 1))[0, 0]
    h, w = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 45: ((1, 1), (-1, -1)), 90: ((1, 0), (-1, 0)), 135: ((1, -1), (-1, 1))}
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for direction, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        sector = ((angle - direction + 22.5) % 180) < 45
        n1 = m[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = m[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= sector & (mag > n1) & (mag >= n2)
    strong = keep & (mag > high)
    weak = keep & (mag > low)
    edges = strong
    while True:  # hysteresis: weak pixels 8-connected to strong ones
        grown = (F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0) & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return _hwc3((edges.numpy() * 255).astype(np.uint8))


def invert(img: np.ndarray) -> np.ndarray:
    return 255 - img[..., :3]


def threshold(img: np.ndarray, level: float) -> np.ndarray:
    return _hwc3(((_gray(img) > level) * 255).astype(np.uint8))


def xdog(img: np.ndarray, level: float) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 and 5), thresholded: sketch lines white on black."""
    f = img[..., :3].astype(np.float32)
    dog = (255 - np.min(_gaussian(f, 5.0) - _gaussian(f, 0.5), axis=2)).clip(0, 255)
    return _hwc3(((2 * (255 - dog) > level) * 255).astype(np.uint8))


def binary(img: np.ndarray, level: float) -> np.ndarray:
    """Dark pixels white (inverted binary threshold); level 0 or 255 picks Otsu's threshold."""
    gray = _gray(img).round().clip(0, 255)
    if level <= 0 or level >= 255:
        level = _otsu(gray.astype(np.uint8))
    return _hwc3(((gray <= level) * 255).astype(np.uint8))


def _otsu(gray: np.ndarray) -> float:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total, levels = hist.sum(), np.arange(256)
    w0 = np.cumsum(hist)
    mu = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 / total - mu) ** 2 / (w0 * w1)
    return float(np.nanargmax(between))


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return _gaussian(img[..., :3].astype(np.float32), max(sigma, 0.01)).round().clip(0, 255).astype(np.uint8)


def color_grid(img: np.ndarray) -> np.ndarray:
    """A 64x coarser colour grid, scaled back with nearest neighbour (t2ia_color_grid)."""
    h, w = img.shape[:2]
    small = Image.fromarray(img[..., :3]).resize((max(1, w // 64), max(1, h // 64)), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def shuffle(img: np.ndarray, seed: int) -> np.ndarray:
    """Content shuffle: resample the image along a smooth random displacement field (seeded by the job)."""
    h, w = img.shape[:2]
    gen = torch.Generator().manual_seed(seed & 0xFFFFFFFF)
    coarse = torch.rand(1, 2, 8, 8, generator=gen) * 2 - 1
    grid = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)
    t = torch.from_numpy(img[..., :3].astype(np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(t, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="reflection", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def tile_resample(img: np.ndarray, rate: float) -> np.ndarray:
    h, w = img.shape[:2]
    rate = max(rate, 1.0)
    size = (max(1, int(w / rate)), max(1, int(h / rate)))
    return np.asarray(Image.fromarray(img[..., :3]).resize(size, Image.Resampling.BOX))


# ---------------------------------------------------------------- the table
def _no_weights(name: str, tag: str, run: Callable[..., np.ndarray], **extra) -> Preprocessor:
    return Preprocessor(name, run, tag, **extra)


def _weights(name: str, tag: str, annotator: str, build: Builder | None = None, **extra) -> Preprocessor:
    return Preprocessor(name, None, tag, annotator=annotator, build=build, **extra)


# Depth Anything V2 small, base or large (sd-webui-controlnet ships the large one); the size comes from the shapes
DEPTH_ANYTHING_FILES = "|".join(f"depth_anything_v2_vit{size}.safetensors" for size in "sbl")
PREPROCESSORS: tuple[Preprocessor, ...] = (
    _no_weights("none", "All", lambda img, res, a, b, seed: img[..., :3], resolution=None),
    _no_weights("canny", "Canny", lambda img, res, a, b, seed: canny(img, a, b),
                a=Slider("Canny Low Threshold", 100, 1, 255), b=Slider("Canny High Threshold", 200, 1, 255)),
    _no_weights("invert", "Lineart", lambda img, res, a, b, seed: invert(img),
                aliases=("invert (from white bg & black line)",)),
    _no_weights("threshold", "Scribble", lambda img, res, a, b, seed: threshold(img, a),
                a=Slider("Binarization Threshold", 127, 0, 255), aliases=("scribble_threshold",)),
    _no_weights("scribble_xdog", "Scribble", lambda img, res, a, b, seed: xdog(img, a),
                a=Slider("XDoG Threshold", 32, 1, 64)),
    _no_weights("binary", "Scribble", lambda img, res, a, b, seed: binary(img, a),
                a=Slider("Binary threshold", 0, 0, 255)),
    _no_weights("blur_gaussian", "Tile", lambda img, res, a, b, seed: blur(img, a),
                a=Slider("Sigma", 9.0, 0.01, 64.0, 0.01)),
    _no_weights("tile_resample", "Tile", lambda img, res, a, b, seed: tile_resample(img, a), resolution=None,
                a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
    _no_weights("tile_colorfix", "Tile", lambda img, res, a, b, seed: img[..., :3], resolution=None,
                a=Slider("Variation", 8.0, 3.0, 32.0)),
    _no_weights("tile_colorfix+sharp", "Tile", lambda img, res, a, b, seed: img[..., :3], resolution=None,
                a=Slider("Variation", 8.0, 3.0, 32.0), b=Slider("Sharpness", 1.0, 0.0, 2.0, 0.01)),
    _no_weights("shuffle", "Shuffle", lambda img, res, a, b, seed: shuffle(img, seed)),
    _no_weights("t2ia_color_grid", "T2I-Adapter", lambda img, res, a, b, seed: color_grid(img),
                aliases=("color",)),
    _no_weights("inpaint_only", "Inpaint", lambda img, res, a, b, seed: img, resolution=None, uses_mask=True),
    *(_no_weights(name, "IP-Adapter", lambda img, res, a, b, seed: img, resolution=None)
      for name in ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith")),
    *(_no_weights(name, "Reference", lambda img, res, a, b, seed: img[..., :3], resolution=None,
                  a=Slider("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0, 0.01))
      for name in ("reference_only", "reference_adain", "reference_adain+attn")),
    _weights("depth_anything_v2", "Depth", DEPTH_ANYTHING_FILES, build=depth_anything.build),
    _weights("depth_midas", "Depth", "dpt_hybrid-midas-501f0c75.pt", build=midas.build_depth),
    _weights("normal_midas", "NormalMap", "dpt_hybrid-midas-501f0c75.pt", build=midas.build_normal,
             a=Slider("Normal Background Threshold", 0.4, 0.0, 1.0, 0.01)),
    _weights("dw_openpose_full", "OpenPose", "dw-ll_ucoco_384.onnx", build=build_dwpose),
    _weights("openpose", "OpenPose", "body_pose_model.pth", build=build_openpose),
    _weights("lineart_realistic", "Lineart", "sk_model.pth", lineart.build, aliases=("lineart_realistic", "lineart")),
    _weights("lineart_coarse", "Lineart", "sk_model2.pth", lineart.build),
    _weights("lineart_anime", "Lineart", "netG.pth", lineart.build_anime),
    _weights("softedge_hed", "SoftEdge", "ControlNetHED.pth|ControlNetHED_Apache2.pth", hed.build, aliases=("softedge_hed", "hed")),
    _weights("softedge_hedsafe", "SoftEdge", "ControlNetHED.pth|ControlNetHED_Apache2.pth", hed.build_safe,
             aliases=("softedge_hedsafe", "hed_safe", "softedge_hed_safe")),
    _weights("softedge_pidinet", "SoftEdge", "table5_pidinet.pth", pidinet.build,
             aliases=("softedge_pidinet", "pidinet")),
    _weights("softedge_pidisafe", "SoftEdge", "table5_pidinet.pth", pidinet.build_safe,
             aliases=("softedge_pidisafe", "pidinet_safe", "softedge_pidinet_safe")),
    _weights("normal_bae", "NormalMap", "scannet.pt"),
    _weights("openpose_hand", "OpenPose", "body_pose_model.pth", build_hand),
    _weights("openpose_face", "OpenPose", "body_pose_model.pth", build_face),
    _weights("openpose_faceonly", "OpenPose", "body_pose_model.pth", build_faceonly),
    _weights("openpose_full", "OpenPose", "body_pose_model.pth", build_full),
    _no_weights("lineart_standard", "Lineart", lambda img, res, a, b, seed: lineart_standard(img),
                aliases=("lineart_standard (from white bg & black line)",)),
    _weights("scribble_hed", "Scribble", "ControlNetHED.pth|ControlNetHED_Apache2.pth", build_scribble_hed,
             aliases=("scribble_hed", "fake_scribble")),
    _weights("scribble_pidinet", "Scribble", "table5_pidinet.pth", build_scribble_pidinet,
             aliases=("scribble_pidinet", "pidinet_scribble")),
    _weights("t2ia_sketch_pidi", "T2I-Adapter", "table5_pidinet.pth", build_sketch_pidi,
             aliases=("t2ia_sketch_pidi", "pidinet_sketch")),
    # IP-Adapter FaceID: the unit's adapter reads the face (insightface buffalo_l); the image passes through
    *(_no_weights(name, "IP-Adapter", lambda img, res, a, b, seed: img, resolution=None)
      for name in ("ip-adapter_face_id", "ip-adapter_face_id_plus")),
)


def find(name: str) -> Preprocessor | None:
    low = name.strip().lower()
    return next((p for p in PREPROCESSORS if p.name == low or low in p.aliases), None)


def _slider_value(value: float, slider: Slider | None) -> float:
    if slider is None:
        return value
    return slider.value if value < slider.min or value > slider.max else value


def run(pre: Preprocessor, image: Image.Image, mask: Image.Image | None, resolution: int, a: float, b: float,
        seed: int, annotators: Annotators) -> np.ndarray:
    """The detected map (uint8 HxWx3, or HxWx4 for inpaint_only with its mask in the alpha channel)."""
    runner = pre.run or annotators.runner(pre.name, pre.annotator, pre.build)
    rgb = np.asarray(image.convert("RGB"))
    if pre.uses_mask:
        alpha = np.zeros(rgb.shape[:2], np.uint8) if mask is None else \
            np.asarray(mask.convert("L").resize(image.size, Image.Resampling.NEAREST))
        return np.concatenate([rgb, alpha[..., None]], axis=2)
    if pre.resolution is not None:
        rgb = resize_short_side(rgb, int(_slider_value(resolution, pre.resolution)))
    return runner(rgb, resolution, _slider_value(a, pre.a), _slider_value(b, pre.b), seed)
