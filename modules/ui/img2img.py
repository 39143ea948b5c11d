"""The img2img tab: img2img, inpaint (brush in Gradio's image editor), inpaint upload, outpaint."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from modules.errors import InvalidParams
from modules.pipeline.params import INPAINTING_FILLS, RESIZE_MODES
from modules.ui.bindings import Fields
from modules.ui.context import UIContext
from modules.ui.generation import GenerationTab, build_generation_tab
from modules.ui.img2img_batch import build_batch_inputs, wire_batch
from modules.ui.interrogate import interrogate_buttons, wire_interrogate
from modules.ui.safe_image import SafeImage

MODES = (("img2img", "img2img"), ("sketch", "Sketch"), ("inpaint", "Inpaint"), ("inpaint_sketch", "Inpaint sketch"),
         ("inpaint_upload", "Inpaint upload"), ("outpaint", "Outpaint"), ("batch", "Batch"))
SKETCH_COLORS = ["#000000", "#ffffff", "#e03c31", "#f2a900", "#2fa84f", "#2d6cdf", "#7d3c98"]
INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
SIZE_FROM = ("Resize to", "Resize by")
DEFAULT_BRUSH = 20  # radius before an image is known (a 512x512 image gets 21)


def build_img2img_tab(ui: UIContext, checkpoint: gr.Dropdown) -> GenerationTab:
    with gr.Tab("img2img", id="img2img", elem_id="tab-img2img"):
        tab = build_generation_tab(ui, "img2img", "img2img", checkpoint, _image_inputs)
        wire_interrogate(ui, tab)
    wire_batch(ui, tab, checkpoint)
    return tab


def _image_inputs(fields: Fields) -> tuple[set, Any, dict]:
    mode = gr.State("img2img")
    handles: dict[str, Any] = {"mode": mode}
    with gr.Tabs(elem_id="img2img-modes") as modes:
        for key, label in MODES:
            with gr.Tab(label, id=key, elem_id=f"img2img-mode-{key}") as tab:
                _mode_inputs(key, handles)
            tab.select(lambda k=key: k, outputs=mode, queue=False)
    handles["modes"] = modes
    handles["interrogate"] = interrogate_buttons()
    _resize_by(handles)
    _img2img_fields(fields)
    extra = {mode, handles["image"], handles["editor"], handles["sketch"], handles["inpaint_sketch"],
             handles["upload_image"], handles["upload_mask"],
             handles["outpaint_image"], *handles["pads"].values(), handles["size_from"], handles["scale"]}

    def collect(data: dict) -> tuple[str, dict[str, Any], dict[str, Any]]:
        return collect_inputs(data[mode], data, handles)

    return extra, collect, handles


def _mode_inputs(key: str, handles: dict[str, Any]) -> None:
    if key == "img2img":
        handles["image"] = SafeImage(label="Image", type="pil", image_mode="RGBA", height=360,
                                    elem_id="img2img-image", sources=["upload", "clipboard"])
    elif key == "inpaint":
        editor = handles["editor"] = gr.ImageEditor(
            label="Image and mask (paint the area to repaint)", type="pil", image_mode="RGBA", height=420,
            elem_id="inpaint-editor", sources=["upload", "clipboard"], transforms=(), layers=False,
            brush=mask_brush(None), format="png")
        editor.upload(fit_brush, inputs=editor, outputs=editor, queue=False, show_progress="hidden")
    elif key in ("sketch", "inpaint_sketch"):
        label = ("Image: draw on it in colour (the drawing is the init image)" if key == "sketch" else
                 "Image: draw in colour on the area to repaint (the drawing is kept as the start)")
        handles[key] = gr.ImageEditor(
            label=label, type="pil", image_mode="RGBA", height=420, elem_id=f"img2img-{key.replace('_', '-')}",
            sources=["upload", "clipboard"], transforms=(), layers=False,
            brush=gr.Brush(default_size=6, colors=SKETCH_COLORS, default_color=SKETCH_COLORS[2],
                           color_mode="defaults"), format="png")
    elif key == "inpaint_upload":
        with gr.Row():
            handles["upload_image"] = SafeImage(label="Image", type="pil", image_mode="RGBA", height=300,
                                               elem_id="inpaint-upload-image")
            handles["upload_mask"] = SafeImage(label="Mask (white: repaint)", type="pil", image_mode="L",
                                              height=300, elem_id="inpaint-upload-mask")
    elif key == "batch":
        build_batch_inputs(handles)
    else:
        handles["outpaint_image"] = SafeImage(label="Image", type="pil", image_mode="RGBA", height=300,
                                             elem_id="outpaint-image")
        with gr.Row():
            handles["pads"] = {side: gr.Slider(0, 512, value=64 if side in ("left", "right") else 0, step=8,
                                               label=f"Pixels to add: {side}", elem_id=f"outpaint-{side}")
                               for side in ("left", "right", "up", "down")}


def _resize_by(handles: dict[str, Any]) -> None:
    """A1111's "Resize to" / "Resize by": with "Resize by", width x height is the image's size times the scale."""
    with gr.Row(equal_height=True):
        size_from = handles["size_from"] = gr.Radio(list(SIZE_FROM), value=SIZE_FROM[0], label="Size",
                                                    elem_id="img2img-size-from", scale=2)
        scale = handles["scale"] = gr.Slider(0.05, 4.0, value=1.0, step=0.05, label="Scale",
                                             elem_id="img2img-resize-by", scale=2)
    readout = gr.Markdown("", elem_id="img2img-resize-by-size")
    sources = [handles[k] for k in ("image", "upload_image", "outpaint_image")]

    def show(choice: str, factor: float, *images) -> str:
        image = next((i for i in images if i is not None), None)
        if choice != SIZE_FROM[1] or image is None:
            return ""
        width, height = scaled_size(image.size, factor)
        return f"Resize by {factor:g}: {image.width}x{image.height} \u2192 **{width}x{height}**"

    for trigger in (size_from.change, scale.change, *(i.change for i in sources)):
        trigger(show, inputs=[size_from, scale, *sources], outputs=readout, show_progress="hidden")


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The image's size times `factor`, rounded to multiples of 8 (at least 64)."""
    return tuple(max(64, int(round(side * factor / 8)) * 8) for side in size)


def _img2img_fields(fields: Fields) -> None:
    fields["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], type="index", label="Resize mode",
                                     elem_id="img2img-resize-mode")
    fields["denoising_strength"] = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength",
                                             elem_id="img2img-denoising")
    with gr.Accordion("Inpainting", open=False, elem_id="img2img-inpaint-options"):
        fields["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img-mask-blur")
        fields["inpainting_mask_invert"] = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], type="index",
                                                    label="Mask mode", elem_id="img2img-inpainting-mask-invert")
        fields["inpainting_fill"] = gr.Radio(list(INPAINTING_FILLS), value="original", type="index",
                                             label="Masked content", elem_id="img2img-inpainting-fill")
        fields["inpaint_full_res"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], type="index",
                                              label="Inpaint area", elem_id="img2img-inpaint-area")
        fields["inpaint_full_res_padding"] = gr.Slider(0, 256, value=32, step=4,
                                                       label="Only masked padding, pixels",
                                                       elem_id="img2img-inpaint-padding")


def brush_size(image: Image.Image | None) -> int:
    """Brush radius in image pixels: about 1/24 of the short side (3 px at 64, 21 at 512, 43 at 1024)."""
    if image is None:
        return DEFAULT_BRUSH
    return max(2, min(round(min(image.size) / 24), 64))


def mask_brush(image: Image.Image | None) -> gr.Brush:
    return gr.Brush(default_size=brush_size(image), colors=["#ffffff"], default_color="#ffffff", color_mode="fixed")


def fit_brush(value: dict | None) -> gr.ImageEditor:
    """After an upload: a brush sized to the image (Gradio's "auto" is a fixed 25 px, huge on small images)."""
    return gr.ImageEditor(brush=mask_brush((value or {}).get("background")))


def editor_mask(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """Gradio's editor value -> (background image, mask: white where any layer was painted)."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size)
        mask.paste(255, (0, 0), alpha.point(lambda a: 255 if a > 0 else 0))
    return background.convert("RGB"), mask if mask.getbbox() else None


def sketch_inputs(value: dict | None, with_mask: bool) -> tuple[Image.Image | None, Image.Image | None]:
    """Sketch: the picture with the drawing on it; inpaint sketch: that, and the drawn strokes as the mask."""
    background, mask = editor_mask(value)
    if background is None:
        return None, None
    composite = (value or {}).get("composite")
    image = composite.convert("RGB") if composite is not None else background
    if with_mask and mask is None:
        raise InvalidParams("Draw on the image first: the strokes mark the area to repaint.")
    return image, mask if with_mask else None


def collect_inputs(mode: str, data: dict, handles: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The active mode's images (and outpaint sizes) as params fields; raises InvalidParams when missing."""
    extra: dict[str, Any] = {}
    if mode == "batch":
        raise InvalidParams("Batch: press \"Generate batch\" in the Batch tab (one job per image of the folder).")
    if mode == "inpaint":
        image, mask = editor_mask(data.get(handles["editor"]))
        if image is not None and mask is None:
            raise InvalidParams("Paint a mask on the image first (the area to repaint).")
    elif mode in ("sketch", "inpaint_sketch"):
        image, mask = sketch_inputs(data.get(handles[mode]), mode == "inpaint_sketch")
    elif mode == "inpaint_upload":
        image, mask = data.get(handles["upload_image"]), data.get(handles["upload_mask"])
        if image is not None and mask is None:
            raise InvalidParams("Upload a mask as well (white: the area to repaint).")
    else:
        image = data.get(handles["outpaint_image" if mode == "outpaint" else "image"])
        mask = None
    if image is None:
        raise InvalidParams("Add an image first (drop one on the image box).")
    if data.get(handles["size_from"]) == SIZE_FROM[1] and mode != "outpaint":
        extra["width"], extra["height"] = scaled_size(image.size, float(data.get(handles["scale"]) or 1.0))
    if mode == "outpaint":
        pads = tuple(int(data.get(handles["pads"][s]) or 0) for s in ("left", "right", "up", "down"))
        extra["outpaint"] = pads
    if mask is not None:
        mask = mask.convert("L")
    return "inpaint" if mask is not None else "img2img", extra, {"init_images": [image.convert("RGB")],
                                                                "mask": mask}
