"""Five-point face alignment and paste-back, in torch.

A similarity transform (rotation, uniform scale, translation) maps the detected landmarks onto the
restoration model's template by least squares; the face is cut out with that transform, and the
restored face is warped back with it and blended in under a feathered mask. Coordinates are pixel
centres (pixel (0, 0) spans -0.5..0.5), as OpenCV's warpAffine uses them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# FFHQ 512x512 template: left eye, right eye, nose tip, mouth left, mouth right (GFPGAN / CodeFormer)
TEMPLATE_512 = ((192.98138, 239.94708), (318.90277, 240.1936), (256.63416, 314.01935),
                (201.26117, 371.41043), (313.08905, 371.15118))
BORDER_RGB = (135.0, 133.0, 132.0)  # outside the image, as facexlib pads the crop


def template(size: int) -> torch.Tensor:
    return torch.tensor(TEMPLATE_512, dtype=torch.float64) * (size / 512)


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 2x3 matrix [[a, -b, tx], [b, a, ty]] minimising sum |M src - dst|^2 (least squares)."""
    src, dst = src.double(), dst.double()
    x, y = src[:, 0], src[:, 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows = torch.cat([torch.stack([x, -y, one, zero], 1), torch.stack([y, x, zero, one], 1)])
    target = torch.cat([dst[:, 0], dst[:, 1]])
    a, b, tx, ty = torch.linalg.lstsq(rows, target[:, None]).solution[:, 0].tolist()
    return torch.tensor([[a, -b, tx], [b, a, ty]], dtype=torch.float64)


def invert(m: torch.Tensor) -> torch.Tensor:
    full = torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=m.dtype)])
    return torch.linalg.inv(full)[:2]


def apply(m: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points.double() @ m[:, :2].T + m[:, 2]


def _grid(m: torch.Tensor, out_h: int, out_w: int, in_h: int, in_w: int, top: int = 0, left: int = 0
          ) -> torch.Tensor:
    """grid_sample grid: output pixel (x + left, y + top) reads input pixel `m` applied to it."""
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64) + top,
                            torch.arange(out_w, dtype=torch.float64) + left, indexing="ij")
    src = apply(m, torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)).view(out_h, out_w, 2)
    norm = torch.tensor([in_w, in_h], dtype=torch.float64)
    return ((2 * src + 1) / norm - 1)[None].float()


def warp_face(image: torch.Tensor, m: torch.Tensor, size: int) -> torch.Tensor:
    """The (1, 3, size, size) face crop of `image` (1, 3, H, W) under the image->face transform `m`."""
    _, _, h, w = image.shape
    border = torch.tensor(BORDER_RGB, dtype=image.dtype).view(1, 3, 1, 1)
    grid = _grid(invert(m), size, size, h, w)
    crop = F.grid_sample(image - border, grid.to(image.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    return crop + border


def _gaussian_blur(x: torch.Tensor, ksize: int) -> torch.Tensor:
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a kernel size
    r = ksize // 2
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _erode(x: torch.Tensor, size: int) -> torch.Tensor:
    if size < 1:
        return x
    pad = (size // 2, size - 1 - size // 2) * 2
    return -F.max_pool2d(F.pad(-x, pad, value=-1.0), size, stride=1)


def face_region(m: torch.Tensor, size: int, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) image pixels that the pasted face can touch, or None."""
    corners = torch.tensor([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    pts = apply(invert(m), corners)
    left, top = max(0, math.floor(pts[:, 0].min()) - 1), max(0, math.floor(pts[:, 1].min()) - 1)
    right, bottom = min(w, math.ceil(pts[:, 0].max()) + 2), min(h, math.ceil(pts[:, 1].max()) + 2)
    return (left, top, right, bottom) if right > left and bottom > top else None


def paste_face(image: torch.Tensor, face: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`image` (1, 3, H, W, 0-255) with `face` (1, 3, S, S) warped back under a feathered mask.

    Only pixels inside the face's warped square change; every other pixel is returned as it was.
    """
    _, _, h, w = image.shape
    size = face.shape[-1]
    region = face_region(m, size, h, w)
    if region is None:
        return image
    left, top, right, bottom = region
    grid = _grid(m, bottom - top, right - left, size, size, top, left).to(face.dtype)
    restored = F.grid_sample(face, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(torch.ones_like(face[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    mask = _erode(mask, 2)
    edge = int(float(mask.sum()) ** 0.5) // 20
    mask = _erode(mask, 2 * edge)
    if edge > 0:
        mask = _gaussian_blur(mask, 2 * edge + 1)
    mask = mask * (mask > 1e-6)
    patch = image[:, :, top:bottom, left:right]
    blended = (mask * restored + (1 - mask) * patch).clamp(0, 255).round()
    out = image.clone()
    out[:, :, top:bottom, left:right] = torch.where(mask > 0, blended, patch)
    return out
