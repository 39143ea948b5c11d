"""Tooltips, icon buttons and the page script: A1111's hints wording where it has one.

Gradio has no tooltip or aria-label arguments, so `page_script` (run once per page load) sets
`title` and `aria-label` by element id suffix, draws the icon buttons as inline SVG, and adds the
keyboard habits of A1111 (Ctrl+Enter, Alt+Enter, Esc, Ctrl+Up/Down emphasis) and the lightbox.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

SCRIPT_PATH = Path(__file__).with_name("atelier.js")

# element id suffix -> tooltip (every generation tab's control has the id "<tab>-<suffix>")
TOOLTIPS: Mapping[str, str] = MappingProxyType({
    "-sampler": "Which algorithm to use to produce the image",
    "-scheduler": "The noise schedule the sampler steps through; Automatic uses the sampler's own",
    "-steps": "How many times to improve the generated image iteratively; higher values take longer; "
              "very low values can produce bad results",
    "-cfg-scale": "Classifier Free Guidance Scale - how strongly the image should conform to prompt - "
                  "lower values produce more creative results",
    "-seed": "A value that determines the output of random number generator - if you create an image with "
             "same parameters and seed as another image, you'll get the same result",
    "-width": "The width of the image, in pixels (a multiple of 8)",
    "-height": "The height of the image, in pixels (a multiple of 8)",
    "-n-iter": "How many batches of images to create (has no impact on generation performance or VRAM usage)",
    "-batch-size": "How many image to create in a single batch (increases generation performance at cost of "
                   "higher VRAM usage)",
    "-subseed": "Seed of a different picture to be mixed into the generation.",
    "-subseed-strength": "How strong of a variation to produce. At 0, there will be no effect. At 1, you will "
                         "get the complete picture with variation seed (except for ancestral samplers, where "
                         "you will just get something).",
    "-seed-resize-w": "Make an attempt to produce a picture similar to what would have been produced with "
                      "same seed at specified resolution",
    "-seed-resize-h": "Make an attempt to produce a picture similar to what would have been produced with "
                      "same seed at specified resolution",
    "-denoising": "Determines how little respect the algorithm should have for image's content. At 0, "
                  "nothing will change, and at 1 you'll get an unrelated image. With values below 1.0, "
                  "processing will take less steps than the Sampling Steps slider specifies.",
    "-hires": "Use a two step process to partially create an image at smaller resolution, upscale, and then "
              "improve details in it without changing composition",
    "-hr-upscaler": "The upscaler used between the two passes of the hires fix",
    "-hr-steps": "Number of sampling steps for upscaled picture. If 0, uses same as for original.",
    "-hr-denoising": "Determines how little respect the algorithm should have for image's content. At 0, "
                     "nothing will change, and at 1 you'll get an unrelated image.",
    "-hr-scale": "Adjusts the size of the image by multiplying the original width and height by the "
                 "selected value. Ignored if either Resize width to or Resize height to are non-zero.",
    "-mask-blur": "How much to blur the mask before processing, in pixels.",
    "-inpainting-fill": "What to put inside the masked area before processing it with Stable Diffusion.",
    "-inpainting-mask-invert": "Inpaint masked: repaint the painted area; Inpaint not masked: repaint "
                               "everything except it",
    "-inpaint-padding": "Only masked: how many pixels around the mask are also given to the model as context",
    "-inpaint-area": "Upscale masked region to target resolution, do inpainting, downscale back and paste "
                     "into original image",
    "-resize-mode": "How the image is fitted to width x height: stretched, cropped, or filled at the edges",
    "-interrupt": "Stop processing images and return any results accumulated so far (Esc).",
    "-skip": "Stop processing current image and continue processing (Alt+Enter).",
    "-generate": "Generate (Ctrl+Enter)",
    "-tiling": "Produce an image that can be tiled.",
    "-styles": "Styles to apply to the prompt when the image is generated",
    "-refiner-checkpoint": "Switch to another model in the middle of generation (None: no refiner)",
    "-refiner-switch-at": "Fraction of sampling steps when the switch to refiner model should happen; "
                          "1=never, 0.5=switch in the middle of generation",
})

# element id suffix -> (icon, aria-label and tooltip)
ICON_BUTTONS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "-random-seed": ("dice", "Set seed to -1, which will cause a new random number to be used every time"),
    "-reuse-seed": ("recycle", "Reuse seed from last generation, mostly useful if it was randomized"),
    "-swap-size": ("swap", "Swap width and height"),
    "-read-params": ("read", "Read generation parameters from prompt into user interface"),
    "-apply-styles": ("brush", "Apply the selected styles to the prompt"),
    "checkpoint-refresh": ("refresh", "Refresh the checkpoint list"),
    "-refiner-refresh": ("refresh", "Refresh the refiner checkpoint list"),
    "_values-fill": ("list", "Fill with all the values this axis can take"),
})

# 16x16 stroke icons (own drawings)
SVG_PATHS: Mapping[str, str] = MappingProxyType({
    "dice": "<rect x='2' y='2' width='12' height='12' rx='2'/><circle cx='5.5' cy='5.5' r='1'/>"
            "<circle cx='10.5' cy='10.5' r='1'/><circle cx='8' cy='8' r='1'/>",
    "recycle": "<path d='M13 8a5 5 0 1 1-1.5-3.6'/><path d='M12 1.5v3h-3'/>",
    "swap": "<path d='M5 2v12M2 5l3-3 3 3M11 14V2M8 11l3 3 3-3'/>",
    "read": "<path d='M13 3L4 12M4 6v6h6'/>",
    "brush": "<path d='M10 2l4 4-6 6-4-4zM4 8l-2 6 6-2'/>",
    "refresh": "<path d='M13.5 8A5.5 5.5 0 1 1 12 4.2'/><path d='M13 1v3.5H9.5'/>",
    "list": "<path d='M5 4h9M5 8h9M5 12h9'/><circle cx='2.5' cy='4' r='.6'/><circle cx='2.5' cy='8' r='.6'/>"
            "<circle cx='2.5' cy='12' r='.6'/>",
})


def svg(name: str) -> str:
    return ("<svg viewBox='0 0 16 16' width='16' height='16' fill='none' stroke='currentColor' stroke-width='1.6' "
            f"stroke-linecap='round' stroke-linejoin='round' aria-hidden='true'>{SVG_PATHS[name]}</svg>")


def page_script() -> str:
    """The `js` of the mounted page: atelier.js with the tooltips and icons filled in."""
    icons = {suffix: {"svg": svg(icon), "label": label} for suffix, (icon, label) in ICON_BUTTONS.items()}
    return (SCRIPT_PATH.read_text(encoding="utf-8")
            .replace("__TOOLTIPS__", json.dumps(dict(TOOLTIPS)))
            .replace("__ICONS__", json.dumps(icons)))


KEYEDIT_OPTION = "keyedit_precision_attention"  # A1111's option name; its default step is 0.1


def keyedit_step(options) -> float:
    try:
        step = float(options.get(KEYEDIT_OPTION, 0.1))
    except (TypeError, ValueError):
        return 0.1
    return step if 0 < step <= 1 else 0.1


def ui_config_html(options) -> str:
    """Settings the page script reads (refreshed on every page load)."""
    return f"<div data-keyedit-step='{keyedit_step(options)}'></div>"
