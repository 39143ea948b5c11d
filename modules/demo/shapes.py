"""A procedural captioned-shapes dataset: one flat shape on a plain background, reproducible from a seed.

Every sample is drawn from `(seed, index)` alone, so the whole dataset is reproducible and any
slice can be rebuilt on any machine. Attributes are sampled on the CPU; images are rasterised
with torch on whatever device is given (anti-aliased signed distances, no PIL).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 50, 170), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# name -> (column, row) on a 3x3 grid; the caption words come from POSITION_WORDS
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "centre": (1, 1),
    "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POSITION_WORDS: dict[str, tuple[str, str]] = {  # (short form, "in the ..." form)
    "top left": ("top left", "upper left corner"), "top": ("top", "top middle"),
    "top right": ("top right", "upper right corner"), "left": ("left", "middle left"),
    "centre": ("centre", "center"), "right": ("right", "middle right"),
    "bottom left": ("bottom left", "lower left corner"), "bottom": ("bottom", "bottom middle"),
    "bottom right": ("bottom right", "lower right corner"),
}
SIZES = {"small": 0.11, "large": 0.17}  # radius as a fraction of the image side
SQUARE_HALF_SIDE = 0.85  # of the radius: a square's half side, so its area is close to the circle's
GRID = (0.22, 0.5, 0.78)  # shape centres as fractions of the side
HELD_OUT_EVERY = 12  # one attribute combination in this many is never used in training


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    @property
    def combo(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.background, self.position)


def is_held_out(scene: Scene) -> bool:
    """Combinations kept out of training (a fixed hash rule), used by the evaluator."""
    key = "|".join(scene.combo).encode()
    return zlib.crc32(key) % HELD_OUT_EVERY == 0


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every (shape, colour, background, position) combination at the 'large' size."""
    out = [Scene(s, c, b, p, "large") for s in SHAPES for c in COLOURS for b in COLOURS if b != c
           for p in POSITIONS]
    return out if held_out is None else [s for s in out if is_held_out(s) == held_out]


def sample_scene(rng: random.Random) -> Scene:
    """A random training scene (never a held-out combination)."""
    while True:
        colour = rng.choice(list(COLOURS))
        scene = Scene(rng.choice(SHAPES), colour, rng.choice([c for c in COLOURS if c != colour]),
                      rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))
        if not is_held_out(scene):
            return scene


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, style: int = 0, omit: frozenset[str] = frozenset()) -> str:
    """One of five phrasings; `omit` may hold 'colour', 'background', 'position', 'size'."""
    size = "" if "size" in omit else scene.size + " "
    colour = "" if "colour" in omit else scene.colour + " "
    thing = f"{size}{colour}{scene.shape}".strip()
    short, long = POSITION_WORDS[scene.position]
    bg = None if "background" in omit else scene.background
    at = None if "position" in omit else scene.position
    phrasings = (
        [_a(thing), bg and f"on {_a(bg)} background", at and f", {short}"],
        [bg and f"{bg} background with", _a(thing), at and f"in the {long}"],
        [_a(thing), at and f"at the {short}", bg and f", {bg} background"],
        [at and f"{short}:", thing, bg and f"over {bg}"],
        [thing, bg and f"on {bg}", at and f"in the {long}"],
    )
    text = " ".join(p for p in phrasings[style % len(phrasings)] if p)
    return text.replace(" ,", ",").strip(" ,:")


def training_caption(scene: Scene, rng: random.Random, drop: float = 0.1) -> str:
    """A random phrasing, each of colour / background / position left out at rate `drop`
    (size at 0.5, since the evaluator's prompts never name it)."""
    omit = frozenset(a for a in ("colour", "background", "position", "size")
                     if rng.random() < (0.5 if a == "size" else drop))
    return caption(scene, rng.randrange(5), omit)


def _sdf(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of a shape of radius r centred at the origin."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return torch.maximum(x.abs(), y.abs()) - h
    # upward triangle inscribed in the 2r box: apex (0, -r), base corners (+-r, r)
    left = (-2 * x - y - r) / 5**0.5
    right = (2 * x - y - r) / 5**0.5
    return torch.maximum(torch.maximum(y - r, left), right)


def render(scenes: list[Scene], size: int = 128, jitter: torch.Tensor | None = None,
           offsets: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [N, 3, size, size] in [-1, 1], rasterised in one batched pass.

    `jitter` [N, 2, 3] shifts shape / background colours (0-255 units); `offsets` [N, 2] moves
    the shape centres (fractions of the side).
    """
    n = len(scenes)
    grid = torch.tensor([[GRID[POSITIONS[s.position][0]], GRID[POSITIONS[s.position][1]]] for s in scenes])
    if offsets is not None:
        grid = grid + offsets
    centre = (grid * size).to(device)[:, :, None, None]
    radius = (torch.tensor([SIZES[s.size] for s in scenes]) * size).to(device)[:, None, None]
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    x = coords[None, None, :] - centre[:, 0]
    y = coords[None, :, None] - centre[:, 1]
    sdf = torch.stack([_sdf(shape, x, y, radius) for shape in SHAPES], dim=1)  # [N, 3, S, S]
    which = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
    cover = (0.5 - sdf[torch.arange(n, device=device), which]).clamp(0, 1)
    colours = torch.tensor([[COLOURS[s.colour], COLOURS[s.background]] for s in scenes], dtype=torch.float32)
    if jitter is not None:
        colours = (colours + jitter).clamp(0, 255)
    colours = colours.to(device)
    fg, bg = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
    img = bg + (fg - bg) * cover[:, None]
    return img / 127.5 - 1.0


def sample_batch(seed: int, start: int, count: int, size: int = 128, device: torch.device | str = "cpu",
                 caption_drop: float = 0.1) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Dataset items `start .. start+count-1` of the dataset `seed`: images [N,3,S,S], captions, scenes.

    Each item depends only on (seed, index), through Python's portable `random.Random`.
    """
    scenes, captions, jitter, offsets = [], [], [], []
    for index in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + index)
        scene = sample_scene(rng)
        scenes.append(scene)
        jitter.append([[rng.uniform(-12, 12) for _ in range(3)] for _ in range(2)])
        offsets.append([rng.uniform(-0.03, 0.03) for _ in range(2)])
        captions.append(training_caption(scene, rng, caption_drop))
    images = render(scenes, size, torch.tensor(jitter), torch.tensor(offsets), device)
    return images, captions, scenes
