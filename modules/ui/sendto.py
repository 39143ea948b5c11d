"""Send-to buttons between tabs: results -> img2img / inpaint / Extras / PNG info,
PNG info and History -> txt2img / img2img / Extras."""
from __future__ import annotations

import gradio as gr
from PIL import Image

from modules import infotext
from modules.ui.bindings import field_defaults
from modules.ui.context import UIContext
from modules.ui.generation import GenerationTab
from modules.ui.jobs import params_class
from modules.ui.prompts import apply_infotext, component_widgets
from modules.ui.results import selected
from modules.ui.sections import pasted_updates, section_components


def _open(path: str | None) -> Image.Image | None:
    if not path:
        return None
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _image_outputs(target: GenerationTab, mode: str) -> dict:
    handles = target.handles
    return {"img2img": handles["image"], "inpaint": handles["editor"]}.get(mode) or handles["image"]


def _to_tab(ui: UIContext, target: GenerationTab, tabs: gr.Tabs, checkpoint: gr.Dropdown, mode: str | None,
            text: str, image: Image.Image | None) -> dict:
    """Updates that fill `target` from infotext, put the image in place and switch to the tab."""
    defaults = field_defaults(params_class("txt2img" if target.name == "txt2img" else "img2img"))
    updates = apply_infotext(ui, target.fields, defaults, checkpoint, text) if text else {}
    if text and text.strip():
        updates.update(pasted_updates(ui.app, target.name, target.sections, infotext.parse(text)))
    updates[tabs] = gr.Tabs(selected=target.name)
    if mode is not None:
        handles = target.handles
        updates[handles["modes"]] = gr.Tabs(selected=mode)
        updates[handles["mode"]] = mode
        if image is not None:
            if mode == "inpaint":
                updates[handles["editor"]] = {"background": image, "layers": [], "composite": image}
            else:
                updates[handles["image"]] = image
    return updates


def _outputs(ui: UIContext, target: GenerationTab, tabs: gr.Tabs, checkpoint: gr.Dropdown, with_images: bool) -> list:
    outputs = [*target.fields.values(), tabs, checkpoint, *component_widgets(ui), *section_components(target.sections)]
    if with_images:
        handles = target.handles
        outputs += [handles["modes"], handles["mode"], handles["image"], handles["editor"]]
    return outputs


def wire_send_to(ui: UIContext, tabs: gr.Tabs, checkpoint: gr.Dropdown) -> None:
    txt2img, img2img, pnginfo = ui.tabs["txt2img"], ui.tabs["img2img"], ui.tabs["pnginfo"]
    extras = ui.tabs["extras"]
    for source in (txt2img, img2img):
        results = source.results
        for mode in ("img2img", "inpaint"):
            def send(state: dict, mode: str = mode) -> dict:
                path, text = selected(state)
                return _to_tab(ui, img2img, tabs, checkpoint, mode, text, _open(path))

            results.send[mode].click(send, inputs=results.state, outputs=_outputs(ui, img2img, tabs, checkpoint, True))

        def to_pnginfo(state: dict) -> dict:
            path, _ = selected(state)  # the file itself: decoded pixels would be re-encoded without infotext
            return {pnginfo.image: path, tabs: gr.Tabs(selected="pnginfo")}

        results.send["pnginfo"].click(to_pnginfo, inputs=results.state, outputs=[pnginfo.image, tabs])

        _wire_to_extras(ui, results.send["extras"], results.state, tabs)

    def png_to_txt2img(text: str) -> dict:
        return _to_tab(ui, txt2img, tabs, checkpoint, None, text, None)

    pnginfo.send["txt2img"].click(png_to_txt2img, inputs=pnginfo.text,
                                  outputs=_outputs(ui, txt2img, tabs, checkpoint, False))
    for mode in ("img2img", "inpaint"):
        def png_to_img2img(text: str, image, mode: str = mode) -> dict:
            return _to_tab(ui, img2img, tabs, checkpoint, mode, text, image)

        pnginfo.send[mode].click(png_to_img2img, inputs=[pnginfo.text, pnginfo.image],
                                 outputs=_outputs(ui, img2img, tabs, checkpoint, True))

    def png_to_extras(image) -> dict:
        return {extras.image: image, tabs: gr.Tabs(selected="extras")}

    pnginfo.send["extras"].click(png_to_extras, inputs=pnginfo.image, outputs=[extras.image, tabs])
    _wire_history(ui, tabs, checkpoint)


def _wire_to_extras(ui: UIContext, button: gr.Button, state: gr.State, tabs: gr.Tabs) -> None:
    """A gallery's "Send to extras": its selected image into the Extras tab, which is then shown."""
    extras = ui.tabs["extras"]

    def to_extras(value: dict) -> dict:
        path, _ = selected(value)
        return {extras.image: _open(path), tabs: gr.Tabs(selected="extras")}

    button.click(to_extras, inputs=state, outputs=[extras.image, tabs])


def _wire_history(ui: UIContext, tabs: gr.Tabs, checkpoint: gr.Dropdown) -> None:
    """History's selected job (its selected image and infotext) -> txt2img, or img2img with the image."""
    txt2img, img2img, history = ui.tabs["txt2img"], ui.tabs["img2img"], ui.tabs["history"]

    def to_txt2img(state: dict) -> dict:
        _, text = selected(state)
        return _to_tab(ui, txt2img, tabs, checkpoint, None, text, None)

    def to_img2img(state: dict) -> dict:
        path, text = selected(state)
        return _to_tab(ui, img2img, tabs, checkpoint, "img2img", text, _open(path))

    history.send["txt2img"].click(to_txt2img, inputs=history.state, outputs=_outputs(ui, txt2img, tabs, checkpoint, False))
    history.send["img2img"].click(to_img2img, inputs=history.state, outputs=_outputs(ui, img2img, tabs, checkpoint, True))
    _wire_to_extras(ui, history.send["extras"], history.state, tabs)
