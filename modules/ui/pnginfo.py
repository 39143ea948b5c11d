"""The PNG info tab: drop an image, read its parameters, send them to txt2img or img2img (or the image to extras)."""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from modules import images as image_files
from modules import infotext
from modules.ui.context import UIContext
from modules.ui.safe_image import SafeImage


@dataclass
class PngInfoTab:
    image: gr.Image
    text: gr.Textbox
    table: gr.HTML
    send: dict[str, gr.Button]


def read_image_info(image: Image.Image | None) -> tuple[str, str]:
    """(infotext, an HTML table of the parsed parameters and other metadata)."""
    if image is None:
        return "", ""
    text = image_files.read_infotext(image) or ""
    rows = []
    if text:
        parsed = infotext.parse(text, defaults=False)
        rows = [(k, v) for k, v in parsed.items() if v not in ("", None)]
    other = [(k, v) for k, v in (image.info or {}).items() if k != "parameters" and isinstance(v, str | int | float)]
    if not rows and not other:
        return "", "<p>This image has no generation parameters.</p>"
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows + other)
    return text, f"<table class='atelier-pnginfo'>{body}</table>"


def build_pnginfo_tab(ui: UIContext) -> PngInfoTab:
    with gr.Tab("PNG Info", id="pnginfo", elem_id="tab-pnginfo"):
        with gr.Row():
            with gr.Column():
                image = SafeImage(label="Source", type="pil", image_mode=None, height=380, elem_id="pnginfo-image",
                                 sources=["upload", "clipboard"])
            with gr.Column():
                text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo-text")
                with gr.Row():
                    send = {name: gr.Button(label, size="sm", elem_id=f"pnginfo-send-to-{name}")
                            for name, label in (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"),
                                                ("inpaint", "Send to inpaint"), ("extras", "Send to extras"))}
                table = gr.HTML("", elem_id="pnginfo-table")
    image.change(read_image_info, inputs=image, outputs=[text, table])  # queued: its upload errors show
    return PngInfoTab(image, text, table, send)
