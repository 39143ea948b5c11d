"""img2img's "Interrogate CLIP", "Interrogate DeepBooru" and "Interrogate WD14" buttons: the current image -> the
prompt.

The image is the active mode's (img2img, sketch, inpaint, ...). Interrogation runs on the app's
engine with the caller's A1111 interrogation options; a missing model or image is shown in the
results' message line, and the prompt is left as it was.
"""
from __future__ import annotations

import asyncio
from typing import Any

import gradio as gr
from PIL import Image

from modules.errors import InvalidParams
from modules.interrogate.options import InterrogateOptions
from modules.ui.context import UIContext
from modules.ui.jobs import readable

BUTTONS = (("clip", "Interrogate CLIP"), ("deepdanbooru", "Interrogate DeepBooru"), ("wd14", "Interrogate WD14"))


def interrogate_buttons() -> dict[str, gr.Button]:
    """The buttons in a row, by model name."""
    with gr.Row(elem_id="img2img-interrogate-row"):
        return {model: gr.Button(label, size="sm", elem_id=f"img2img-interrogate-{model}")
                for model, label in BUTTONS}


def current_image(mode: str, values: dict[str, Any], handles: dict[str, Any]) -> Image.Image | None:
    """The picture of the active mode; editors give their background (the sketch: with the drawing)."""
    if mode in ("inpaint", "sketch", "inpaint_sketch"):
        value = values.get(handles["editor" if mode == "inpaint" else mode]) or {}
        image = value.get("composite") if mode != "inpaint" else None
        return image if image is not None else value.get("background")
    key = {"inpaint_upload": "upload_image", "outpaint": "outpaint_image"}.get(mode, "image")
    return values.get(handles[key])


def wire_interrogate(ui: UIContext, tab: Any) -> None:
    """Each button fills the prompt, or shows why it cannot in the tab's message line."""
    handles, prompt, message = tab.handles, tab.fields["prompt"], tab.results.message
    sources = [handles[k] for k in ("mode", "image", "editor", "sketch", "inpaint_sketch", "upload_image",
                                    "outpaint_image")]

    for model, button in handles["interrogate"].items():
        async def run(data: dict, request: gr.Request, model: str = model) -> dict:
            values = {component: data.get(component) for component in sources}
            try:
                image = current_image(data.get(handles["mode"]), values, handles)
                if image is None:
                    raise InvalidParams("Add an image first (drop one on the image box), then interrogate it.")
                options = InterrogateOptions.from_options(ui.server.options_for(ui.caller(request)))
                text = await asyncio.to_thread(ui.app.engine.interrogator.interrogate, image.convert("RGB"),
                                               model, options)
            except Exception as err:  # an AtelierError's own message; never a stack trace in the page
                return {message: f"❌ **Error:** {readable(err)}"}
            return {prompt: text, message: ""}

        button.click(run, inputs=set(sources), outputs=[prompt, message], show_progress="minimal")
