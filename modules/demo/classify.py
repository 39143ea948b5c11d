"""Read a shapes image back by pixel analysis: background colour, shape colour, shape type, position."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from modules.demo.shapes import COLOURS, GRID, POSITIONS

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
_CUTS = ((GRID[0] + GRID[1]) / 2, (GRID[1] + GRID[2]) / 2)
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background that counts as shape (yellow-orange: 83)
MIN_AREA = 40  # pixels; less than this is "no shape"


@dataclass(frozen=True)
class Reading:
    """What the classifier sees; `shape` is 'none' when no shape stands out from the background."""

    background: str
    colour: str
    shape: str
    position: str
    area: int

    def as_dict(self) -> dict:
        return asdict(self)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb[None]) ** 2).sum(axis=1)))]


def _shape_type(mask: np.ndarray) -> str:
    """Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def _position(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    col = int(np.searchsorted(_CUTS, xs.mean() / w))
    row = int(np.searchsorted(_CUTS, ys.mean() / h))
    return next(name for name, cell in POSITIONS.items() if cell == (col, row))


def shape_mask(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels far from the background colour, restricted to their largest 4-connected part."""
    far = np.sqrt(((pixels - background[None, None]) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    return _largest_component(far)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The 4-connected part of `mask` around its median pixel (grown by repeated dilation)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    pick = int(np.argmin((ys - np.median(ys)) ** 2 + (xs - np.median(xs)) ** 2))
    region = np.zeros_like(mask)
    region[ys[pick], xs[pick]] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if (grown == region).all():
            return region
        region = grown


def classify(image: Image.Image | np.ndarray) -> Reading:
    """Classify one RGB image of the shapes dataset."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = shape_mask(pixels, background)
    if mask.sum() < MIN_AREA:
        return Reading(nearest_colour(background), "none", "none", "none", int(mask.sum()))
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    return Reading(nearest_colour(background), colour, _shape_type(mask), _position(mask), int(mask.sum()))
