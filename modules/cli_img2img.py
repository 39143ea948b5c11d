"""`webui.py generate` flags for img2img, inpainting, outpainting and the hires fix, and their params."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from modules.errors import InvalidParams

RESIZE_MODE_NAMES = {"just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2, "latent-upscale": 3}
FILL_NAMES = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}
HIRES_DEFAULTS = {"hires_scale": 2.0, "hires_upscaler": "Latent", "hires_steps": 0, "hires_resize_x": 0,
                  "hires_resize_y": 0, "hires_sampler": None, "hires_scheduler": None, "hires_prompt": "",
                  "hires_negative_prompt": ""}


def _choice(names: dict[str, int], what: str):
    def parse(text: str) -> int:
        key = text.strip().lower().replace(" ", "-")
        if key.isdigit() and int(key) in names.values():
            return int(key)
        if key in names:
            return names[key]
        raise argparse.ArgumentTypeError(f"{what} must be one of {', '.join(names)} or 0-{len(names) - 1}")

    return parse


def _outpaint(text: str) -> tuple[int, int, int, int]:
    try:
        pads = tuple(int(part) for part in text.split(","))
    except ValueError:
        pads = ()
    if len(pads) != 4 or min(pads) < 0:
        raise argparse.ArgumentTypeError("--outpaint takes LEFT,RIGHT,UP,DOWN pixels, e.g. 64,64,0,0")
    return pads


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("img2img and inpainting (A1111 UI defaults)")
    group.add_argument("--init-image", action="append", default=[], metavar="FILE",
                       help="img2img from this image (repeat for one image per batch item)")
    group.add_argument("--mask", metavar="FILE|alpha", help="inpaint where the mask is white; "
                       "'alpha' repaints the init image's transparent pixels")
    group.add_argument("--denoising-strength", type=float, default=0.75)
    group.add_argument("--resize-mode", type=_choice(RESIZE_MODE_NAMES, "--resize-mode"), default=0,
                       help="just-resize (0), crop-and-resize (1), resize-and-fill (2), latent-upscale (3)")
    group.add_argument("--mask-blur", type=int, default=4)
    group.add_argument("--inpainting-fill", type=_choice(FILL_NAMES, "--inpainting-fill"), default=1,
                       help="masked content: fill (0), original (1), latent-noise (2), latent-nothing (3)")
    group.add_argument("--inpaint-full-res", action="store_true", help="inpaint area: only masked")
    group.add_argument("--inpaint-full-res-padding", type=int, default=32)
    group.add_argument("--inpainting-mask-invert", action="store_true", help="inpaint not masked")
    group.add_argument("--outpaint", type=_outpaint, metavar="LEFT,RIGHT,UP,DOWN",
                       help="extend the init image by these pixels and paint the new borders")
    hires = parser.add_argument_group("hires fix (txt2img)")
    hires.add_argument("--hires", action="store_true", help="enable the hires fix (any --hires-* option does)")
    hires.add_argument("--hires-scale", type=float, default=argparse.SUPPRESS)
    hires.add_argument("--hires-upscaler", default=argparse.SUPPRESS, help="Latent (default), Lanczos, Nearest, ...")
    hires.add_argument("--hires-steps", type=int, default=argparse.SUPPRESS, help="0: the same as --steps")
    hires.add_argument("--hires-resize-x", type=int, default=argparse.SUPPRESS)
    hires.add_argument("--hires-resize-y", type=int, default=argparse.SUPPRESS)
    hires.add_argument("--hires-sampler", default=argparse.SUPPRESS)
    hires.add_argument("--hires-scheduler", default=argparse.SUPPRESS)
    hires.add_argument("--hires-prompt", default=argparse.SUPPRESS)
    hires.add_argument("--hires-negative-prompt", default=argparse.SUPPRESS)


def hires_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Txt2ImgParams hires fields; the fix is on with --hires or any --hires-* option."""
    given = {k: getattr(args, k) for k in HIRES_DEFAULTS if hasattr(args, k)}
    if args.init_image and (args.hires or given):
        raise InvalidParams("the hires fix is for txt2img; it cannot be combined with --init-image")
    if not (args.hires or given):
        return {}
    values = {**HIRES_DEFAULTS, **given}
    return dict(enable_hr=True, denoising_strength=args.denoising_strength, hr_scale=values["hires_scale"],
                hr_upscaler=values["hires_upscaler"], hr_second_pass_steps=values["hires_steps"],
                hr_resize_x=values["hires_resize_x"], hr_resize_y=values["hires_resize_y"],
                hr_sampler_name=values["hires_sampler"], hr_scheduler=values["hires_scheduler"],
                hr_prompt=values["hires_prompt"], hr_negative_prompt=values["hires_negative_prompt"])


def img2img_values(args: argparse.Namespace, common: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Img2ImgParams fields and the input images from the flags; `common` may leave width/height None."""
    from modules.pipeline import masks
    from modules.pipeline.inputs import load_image

    images = [load_image(path, f"init image {path}") for path in args.init_image]
    mask = None
    if args.mask == "alpha":
        mask = masks.alpha_mask(images[0])
    elif args.mask:
        mask = load_image(args.mask, f"mask {args.mask}")
    width, height = _size(args, common, images[0])
    values = {**common, "width": width, "height": height, "denoising_strength": args.denoising_strength,
              "resize_mode": args.resize_mode, "mask_blur": args.mask_blur, "inpainting_fill": args.inpainting_fill,
              "inpaint_full_res": args.inpaint_full_res, "inpaint_full_res_padding": args.inpaint_full_res_padding,
              "inpainting_mask_invert": int(args.inpainting_mask_invert), "outpaint": args.outpaint}
    return {k: v for k, v in values.items() if v is not None}, {"init_images": images, "mask": mask}


def _size(args: argparse.Namespace, common: dict[str, Any], image) -> tuple[int, int]:
    """--width/--height, else the init image's size (plus the outpainting), as A1111's UI fills them in."""
    width, height = common.get("width"), common.get("height")
    pads = args.outpaint or (0, 0, 0, 0)
    if args.outpaint:
        width = width or image.width + pads[0] + pads[1]
        height = height or image.height + pads[2] + pads[3]
        if width % 8 or height % 8:
            raise InvalidParams(f"outpainting the {image.width}x{image.height} image by {','.join(map(str, pads))} "
                                f"gives {width}x{height}; width and height must be multiples of 8 "
                                "(change the padding, or pass --width and --height)")
        return width, height
    if width and height:
        return width, height
    floor_w, floor_h = width or image.width // 8 * 8, height or image.height // 8 * 8
    if (floor_w, floor_h) != (width or image.width, height or image.height):
        print(f"warning: the init image is {image.width}x{image.height}; generating at {floor_w}x{floor_h} "
              "(multiples of 8); pass --width and --height to choose", file=sys.stderr)
    return floor_w, floor_h
