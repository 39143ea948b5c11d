"""SD upscale (img2img): upscale the init image with any pixel upscaler in the upscaler registry
(the model upscalers that extensions register included), cut it into overlapping tiles of the
job's width x height, run img2img on each tile and blend the tiles back together.

Controls in A1111 1.10's `ui()` order: info (text only), overlap, upscaler_index, scale_factor.
`upscaler_index` is an index into the pixel upscalers ("None", "Lanczos", "Nearest", then model
upscalers, as A1111 lists them) or an upscaler name.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from PIL import Image

from modules.plugins import api

TITLE = "SD upscale"
MAX_TILES = 1000
OPTIONS = (
    api.OptionSpec("info", "Will upscale the image by the selected scale factor; use width and height sliders "
                           "to set tile size", None, "html"),
    api.OptionSpec("overlap", "Tile overlap", 64, "slider", 0, 256, 16),
    api.OptionSpec("upscaler_index", "Upscaler", "None", "dropdown"),
    api.OptionSpec("scale_factor", "Scale Factor", 2.0, "slider", 1.0, 4.0, 0.05),
)


def pixel_upscalers(registries: Any) -> list[Any]:
    return [u for u in registries.upscalers if not u.is_latent]


def find_upscaler(registries: Any, choice: Any) -> Any:
    upscalers = pixel_upscalers(registries)
    names = [u.name for u in upscalers]
    text = str(choice).strip()
    if isinstance(choice, int) or text.isdigit():
        index = int(text)
        if not 0 <= index < len(upscalers):
            raise api.InvalidParams(f"SD upscale: upscaler index {index} is out of range (0-{len(names) - 1}: "
                                    f"{', '.join(names)})")
        return upscalers[index]
    for upscaler in upscalers:
        if text.lower() in (upscaler.name.lower(), *(a.lower() for a in upscaler.aliases)):
            return upscaler
    raise api.InvalidParams(f"SD upscale: unknown upscaler {text!r}. Known: {', '.join(names)}")


def upscaled_size(image: Image.Image, scale: float) -> tuple[int, int]:
    return round(image.width * scale), round(image.height * scale)


def upscale(image: Image.Image, upscaler: Any, scale: float) -> Image.Image:
    """The upscaler's result, resized with Lanczos to exactly `scale` times the image (as A1111 does)."""
    size = upscaled_size(image, scale)
    result = upscaler.function(image, scale) if scale > 1.0 else image
    return result if result.size == size else result.resize(size, resample=Image.Resampling.LANCZOS)


def tile_count(size: tuple[int, int], tile: tuple[int, int], overlap: int) -> int:
    def count(length: int, side: int) -> int:
        return max(math.ceil((length - overlap) / max(side - overlap, 1)), 1)

    return count(size[0], tile[0]) * count(size[1], tile[1])


def check(ctx: api.ScriptCheck) -> None:
    p, args = ctx.params, ctx.args
    find_upscaler(ctx.registries, args["upscaler_index"])
    if not p.init_images:
        raise api.InvalidParams("SD upscale needs an init image")
    size = upscaled_size(p.init_images[0], float(args["scale_factor"]))
    if size[0] < p.width or size[1] < p.height:
        raise api.InvalidParams(f"SD upscale: the upscaled image ({size[0]}x{size[1]}) is smaller than one "
                                f"{p.width}x{p.height} tile; lower width and height (the tile size) or raise the scale")
    if int(args["overlap"]) >= min(p.width, p.height):
        raise api.InvalidParams(f"SD upscale: tile overlap {args['overlap']} must be smaller than the tile "
                                f"({p.width}x{p.height})")
    tiles = tile_count(size, (p.width, p.height), int(args["overlap"])) * p.n_iter
    if tiles > MAX_TILES:
        raise api.InvalidParams(f"SD upscale: {tiles} tiles; at most {MAX_TILES}")


def run(ctx: api.ScriptContext) -> api.Result:
    p, args = ctx.params, ctx.args
    upscaler = find_upscaler(ctx.registries, args["upscaler_index"])
    overlap = int(args["overlap"])
    image = upscale(p.init_images[0], upscaler, float(args["scale_factor"]))
    layout = api.split_grid(image, p.width, p.height, overlap)
    tiles = layout.tiles
    batch = p.batch_size
    batches = math.ceil(len(tiles) / batch)
    seed = random.randrange(4294967294) if p.seed == -1 else p.seed
    fields = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler.name}
    ctx.begin(batches * p.n_iter)
    out = api.Result()
    for n in range(p.n_iter):
        done, info, cell_seed = [], None, seed + n
        for b in range(batches):
            if ctx.interrupted:
                out.interrupted = True
                return out
            chunk = tiles[b * batch:(b + 1) * batch]
            cell = dataclasses.replace(p, init_images=tuple(t.image for t in chunk), batch_size=len(chunk), n_iter=1,
                                       seed=cell_seed, mask=None, outpaint=None, save_images=False)
            result = ctx.process(cell, label="tile")
            info = info or (result.infotexts[0] if result.infotexts else "")
            done += result.images
            cell_seed = (result.seeds[0] if result.seeds else cell_seed) + 1
        for tile, tile_image in zip(tiles, done, strict=False):
            tile.image = tile_image
        combined = api.combine_grid(layout)
        text = api.with_infotext_fields(info or "", fields)
        path = ctx.save(combined, seed + n, text)
        out.images.append(combined)
        out.infotexts.append(text)
        out.seeds.append(seed + n)
        out.subseeds.append(p.subseed)
        out.prompts.append(p.prompt)
        out.negative_prompts.append(p.negative_prompt)
        if path is not None:
            out.paths.append(path)
    return out


def choices(tab: str, registries: Any) -> dict[str, list[str]]:
    return {"upscaler_index": [u.name for u in pixel_upscalers(registries)]}


@api.hookimpl
def register_scripts() -> list[api.ScriptSpec]:
    return [api.ScriptSpec(TITLE, run, OPTIONS, tabs=("img2img",), check=check, choices=choices, order=40,
                           description="Upscale, then img2img each overlapping tile and blend them.")]
