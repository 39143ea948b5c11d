"""The shared grid builder: image grids, their legends, and tiles for tiled img2img (SD upscale).

Row and column rules follow A1111: `rows=None` takes the grid option `n_rows` (-1: automatic,
about a square; 0: one row per batch), and never more rows than images. Legends are drawn with
the bundled DejaVu Sans (fonts/, Bitstream Vera licence), so no system font is needed; long
labels wrap to the cell width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path(__file__).parent / "fonts" / "DejaVuSans.ttf"
ACTIVE, INACTIVE = (0, 0, 0), (153, 153, 153)


@dataclass(frozen=True)
class GridAnnotation:
    """One legend line; an inactive one (a prompt-matrix part left out) is grey and struck through."""

    text: str = ""
    is_active: bool = True


def grid_rows(count: int, batch_size: int = 1, n_rows: int = -1, prevent_empty_spots: bool = False) -> int:
    """A1111's rows for `count` images: n_rows > 0 as given, 0 one row per batch, -1 automatic."""
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = max(math.floor(math.sqrt(count)), 1)
        while count % rows:
            rows -= 1
    else:
        rows = max(round(math.sqrt(count)), 1)
    return max(min(rows, count), 1)


def image_grid(images: list[Image.Image], rows: int | None = None, batch_size: int = 1, n_rows: int = -1,
               prevent_empty_spots: bool = False) -> Image.Image:
    """The images laid out row by row on a black canvas, each cell the size of the first image."""
    if not images:
        raise ValueError("a grid needs at least one image")
    rows = grid_rows(len(images), batch_size, n_rows, prevent_empty_spots) if rows is None else min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), box=(i % cols * w, i // cols * h))
    return grid


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(FONT_PATH), size)
    except OSError:  # the bundled file is missing: Pillow's own built-in font
        return ImageFont.load_default(size)


def font_size(cell_width: int, cell_height: int) -> int:
    """A1111's legend size: (width + height) / 25 of a cell."""
    return max((cell_width + cell_height) // 25, 8)


def wrap_text(text: str, font: Any, max_width: float) -> list[str]:
    """Greedy word wrap of `text` to lines at most `max_width` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@dataclass
class _Block:
    lines: list[tuple[str, bool]] = field(default_factory=list)

    def height(self, font: Any, spacing: int) -> int:
        if not self.lines:
            return 0
        return len(self.lines) * (_line_height(font) + spacing) - spacing


def _line_height(font: Any) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def _blocks(texts: list[list[GridAnnotation]], font: Any, width: float) -> list[_Block]:
    blocks = []
    for group in texts:
        block = _Block()
        for a in group:
            block.lines += [(line, a.is_active) for line in wrap_text(a.text, font, width) if a.text]
        blocks.append(block)
    return blocks


def _draw_block(draw: ImageDraw.ImageDraw, block: _Block, cx: float, top: float, font: Any, spacing: int) -> None:
    y = top
    for text, active in block.lines:
        w = font.getlength(text)
        x = cx - w / 2
        draw.text((x, y), text, font=font, fill=ACTIVE if active else INACTIVE)
        if not active:
            mid = y + _line_height(font) / 2
            draw.line((x, mid, x + w, mid), fill=INACTIVE, width=max(1, font.size // 12))
        y += _line_height(font) + spacing


def annotate_grid(grid: Image.Image, cell_width: int, cell_height: int, hor_texts: list[list[GridAnnotation]],
                  ver_texts: list[list[GridAnnotation]], margin: int = 0) -> Image.Image:
    """The grid with column labels on top, row labels on the left, and `margin` pixels between cells.

    `hor_texts[c]` labels column c and `ver_texts[r]` row r; an all-empty side takes no space.
    """
    cols, rows = grid.width // cell_width, grid.height // cell_height
    font = _font(font_size(cell_width, cell_height))
    spacing = font.size // 2
    has_ver = any(a.text for lines in ver_texts for a in lines)
    pad_left = cell_width * 3 // 4 if has_ver else 0
    top_blocks = _blocks(hor_texts, font, cell_width)
    left_blocks = _blocks(ver_texts, font, max(pad_left - spacing, 1))
    heights = [b.height(font, spacing) for b in top_blocks]
    pad_top = max(heights, default=0) + spacing * 2 if any(heights) else 0
    out = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
                    "white")
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((col * cell_width, row * cell_height, (col + 1) * cell_width, (row + 1) * cell_height))
            out.paste(cell, (pad_left + col * (cell_width + margin), pad_top + row * (cell_height + margin)))
    draw = ImageDraw.Draw(out)
    for col, block in enumerate(top_blocks[:cols]):
        cx = pad_left + col * (cell_width + margin) + cell_width / 2
        _draw_block(draw, block, cx, pad_top / 2 - block.height(font, spacing) / 2, font, spacing)
    for row, block in enumerate(left_blocks[:rows]):
        top = pad_top + row * (cell_height + margin) + cell_height / 2 - block.height(font, spacing) / 2
        _draw_block(draw, block, pad_left / 2, top, font, spacing)
    return out


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


@dataclass
class TileGrid:
    """An image cut into overlapping tiles of tile_w x tile_h (rows of tiles, top to bottom)."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    rows: list[list[Tile]] = field(default_factory=list)

    @property
    def tiles(self) -> list[Tile]:
        return [t for row in self.rows for t in row]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    count = max(math.ceil((size - overlap) / max(tile - overlap, 1)), 1)
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), size - tile) for i in range(count)]


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """Cut `image` into tiles that overlap by at least `overlap` pixels and cover it edge to edge."""
    if image.width < tile_w or image.height < tile_h:
        raise ValueError(f"a {image.width}x{image.height} image is smaller than one {tile_w}x{tile_h} tile")
    grid = TileGrid(image.width, image.height, tile_w, tile_h, overlap)
    for y in _starts(image.height, tile_h, overlap):
        grid.rows.append([Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h)))
                          for x in _starts(image.width, tile_w, overlap)])
    return grid


def _ramp(length: int, overlap: int, start_blend: bool) -> np.ndarray:
    weights = np.ones(length, dtype=np.float32)
    if start_blend and overlap > 0:
        n = min(overlap, length)
        weights[:n] = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
    return weights


def combine_grid(grid: TileGrid) -> Image.Image:
    """Reassemble tiles: each tile fades in linearly over the overlap with the tiles before it."""
    out = np.zeros((grid.height, grid.width, 3), dtype=np.float32)
    for r, row in enumerate(grid.rows):
        strip = np.zeros((grid.tile_h, grid.width, 3), dtype=np.float32)
        for c, tile in enumerate(row):
            pixels = np.asarray(tile.image.convert("RGB").resize((grid.tile_w, grid.tile_h)), dtype=np.float32)
            seam = row[c - 1].x + grid.tile_w - tile.x if c else 0
            alpha = _ramp(grid.tile_w, seam, c > 0)[None, :, None]
            region = strip[:, tile.x:tile.x + grid.tile_w]
            strip[:, tile.x:tile.x + grid.tile_w] = region * (1 - alpha) + pixels * alpha
        y = row[0].y
        seam = grid.rows[r - 1][0].y + grid.tile_h - y if r else 0
        alpha = _ramp(grid.tile_h, seam, r > 0)[:, None, None]
        out[y:y + grid.tile_h] = out[y:y + grid.tile_h] * (1 - alpha) + strip * alpha
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))


GRID_FORMATS = ("png", "jpg", "jpeg", "webp")
# A1111's option names and defaults for grids (GET/POST /sdapi/v1/options)
GRID_OPTION_DEFAULTS = {"grid_save": True, "grid_format": "png", "n_rows": -1, "grid_prevent_empty_spots": False,
                        "enable_pnginfo": True}


@dataclass(frozen=True)
class GridOptions:
    """How grids are laid out and saved: A1111's `grid_save`, `grid_format`, `n_rows`,
    `grid_prevent_empty_spots` and `enable_pnginfo` (infotext written into the grid file)."""

    save: bool = True
    format: str = "png"
    n_rows: int = -1
    prevent_empty_spots: bool = False
    infotext: bool = True

    def rows(self, count: int, batch_size: int = 1) -> int:
        """Rows for `count` images under these options (n_rows -1: automatic)."""
        return grid_rows(count, batch_size, self.n_rows, self.prevent_empty_spots)

    def to_json(self) -> dict[str, Any]:
        return {"grid_save": self.save, "grid_format": self.format, "n_rows": self.n_rows,
                "grid_prevent_empty_spots": self.prevent_empty_spots, "enable_pnginfo": self.infotext}


def grid_options(options: Any) -> GridOptions:
    """GridOptions from A1111 option values (missing keys take A1111's defaults); ValueError names a bad one."""
    values = {**GRID_OPTION_DEFAULTS, **{k: options[k] for k in GRID_OPTION_DEFAULTS if k in options}}
    fmt = str(values["grid_format"]).lower()
    if fmt not in GRID_FORMATS:
        raise ValueError(f"grid_format must be one of {', '.join(GRID_FORMATS)}, got {values['grid_format']!r}")
    n_rows = values["n_rows"]
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < -1:
        raise ValueError(f"n_rows must be -1 (automatic), 0 (one row per batch) or a row count, got {n_rows!r}")
    for key in ("grid_save", "grid_prevent_empty_spots", "enable_pnginfo"):
        if not isinstance(values[key], bool):
            raise ValueError(f"{key} must be true or false, got {values[key]!r}")
    return GridOptions(values["grid_save"], fmt, n_rows, values["grid_prevent_empty_spots"],
                       values["enable_pnginfo"])
