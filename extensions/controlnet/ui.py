"""The ControlNet accordion in txt2img and img2img: a tab per unit with image upload, Control Type
filter, preprocessor and model (with refresh), the unit's sliders, a preprocessor preview and
"Send dimensions" (the control image's size into the tab's width and height, in the browser).

Values reach the job as `extension_args["controlnet"]` with flat keys `u<N>_<field>`
(`units.parse_units` groups them); the uploaded image travels as base64 (a hidden textbox filled
when the image changes), so jobs stay JSON. In img2img a unit without an image uses the init image.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from modules.plugins import api

from . import flux, preprocessors
from .control import UNION_TYPES
from .routes import CONTROL_TYPES, control_type, model_titles
from .units import CONTROL_MODES, RESIZE_MODES, parse_infotext


def to_base64(image: Any) -> str:
    if image is None:
        return ""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# "Send dimensions": the control image's size (rounded to multiples of 8) into the tab's width and height.
SEND_SIZE_JS = """() => {
  const img = document.querySelector('#PREFIX-image img');
  if (!img || !img.naturalWidth) return;
  const round8 = (v) => Math.max(64, Math.round(v / 8) * 8);
  const put = (id, v) => document.querySelectorAll(`#${id} input`).forEach((input) => {
    input.value = v;
    input.dispatchEvent(new Event('input', {bubbles: true}));
  });
  put('TAB-width', round8(img.naturalWidth));
  put('TAB-height', round8(img.naturalHeight));
}"""


def _preview(ext: Any, image: Any, module: str, res: float, a: float, b: float, pixel_perfect: bool) -> Any:
    pre = preprocessors.find(module or "none")
    if image is None or pre is None:
        return None
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    try:
        detected = preprocessors.run(pre, image, None, int(res), float(a), float(b), 0, ext.annotators)
    except api.InvalidParams as err:
        import gradio as gr
        raise gr.Error(str(err)) from None
    return Image.fromarray(detected[..., :3])


def slider_update(slider: preprocessors.Slider | None, current: float) -> Any:
    """A resolution / threshold slider as the preprocessor describes it, hidden when it has none. The current
    value stays when it fits the new range (a pasted value arrives together with its module), else the default."""
    import gradio as gr

    if slider is None:
        return gr.update(visible=False)
    fits = slider.min <= float(current) <= slider.max
    return gr.update(visible=True, label=slider.name, minimum=slider.min, maximum=slider.max, step=slider.step,
                     value=float(current) if fits else slider.value)


def module_sliders(name: str, res: float, a: float, b: float) -> tuple:
    """The resolution and threshold sliders' updates for preprocessor `name`."""
    pre = preprocessors.find(name or "none")
    sliders = (pre.resolution, pre.a, pre.b) if pre is not None else (None, None, None)
    return tuple(slider_update(slider, value) for slider, value in zip(sliders, (res, a, b), strict=True))


def _unit_tab(ext: Any, tab: str, n: int) -> dict[str, Any]:
    import gradio as gr

    prefix = f"{tab}-controlnet-{n}"
    models = ["None", *model_titles(ext, ext.hashes)]
    modules = [p.name for p in preprocessors.PREPROCESSORS]
    with gr.Row():
        image = gr.Image(label="Control image", type="pil", sources=["upload", "clipboard"], elem_id=f"{prefix}-image")
        preview = gr.Image(label="Preprocessor preview", type="pil", interactive=False, elem_id=f"{prefix}-preview")
    encoded = gr.Textbox(visible=False, elem_id=f"{prefix}-b64")
    with gr.Row():
        enabled = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}-enabled")
        pixel_perfect = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{prefix}-pixel-perfect")
    kind = gr.Radio(list(CONTROL_TYPES), value="All", label="Control Type", elem_id=f"{prefix}-type")
    with gr.Row():
        module = gr.Dropdown(modules, value="none", label="Preprocessor", elem_id=f"{prefix}-module")
        model = gr.Dropdown(models, value="None", label="Model", elem_id=f"{prefix}-model")
        refresh = gr.Button("🔄", size="sm", scale=0, elem_id=f"{prefix}-refresh")
        run_preview = gr.Button("💥 Preview", size="sm", scale=0, elem_id=f"{prefix}-run-preview")
        send_size = gr.Button("📐 Send dimensions", size="sm", scale=0, elem_id=f"{prefix}-send-size")
    weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control Weight", elem_id=f"{prefix}-weight")
    with gr.Row():
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting Control Step", elem_id=f"{prefix}-start")
        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending Control Step", elem_id=f"{prefix}-end")
    with gr.Row():  # shown, named and ranged per preprocessor (module_sliders), as sd-webui-controlnet does
        res = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution", visible=False,
                        elem_id=f"{prefix}-res")
        a = gr.Slider(-1, 255, value=-1, step=0.01, label="Threshold A", visible=False, elem_id=f"{prefix}-a")
        b = gr.Slider(-1, 255, value=-1, step=0.01, label="Threshold B", visible=False, elem_id=f"{prefix}-b")
    control_mode = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                            elem_id=f"{prefix}-control-mode")
    resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1], label="Resize Mode",
                           elem_id=f"{prefix}-resize-mode")
    union_names = ["Unknown", *UNION_TYPES, *(m for m in flux.UNION_MODES if m not in UNION_TYPES)]  # + FLUX Union's
    union_type = gr.Dropdown(union_names, value="Unknown", label="Union control type (union/ProMax "
                             "models; Unknown: the preprocessor's)", elem_id=f"{prefix}-union-type")

    def pick_type(name: str):
        ext.library.refresh()
        choice = control_type(name, modules, model_titles(ext, ext.hashes))
        return (gr.update(choices=choice["module_list"], value=choice["default_option"]),
                gr.update(choices=choice["model_list"], value=choice["default_model"]))

    def rescan(current: str):
        ext.library.refresh()
        titles = ["None", *model_titles(ext, ext.hashes)]
        return gr.update(choices=titles, value=current if current in titles else "None")

    def uploaded(picture: Any) -> tuple[str, Any]:
        return to_base64(picture), gr.update(value=True) if picture is not None else gr.update()

    image.change(uploaded, image, [encoded, enabled], queue=False)
    module.change(module_sliders, [module, res, a, b], [res, a, b], queue=False)
    kind.change(pick_type, kind, [module, model], queue=False)
    refresh.click(rescan, model, model, queue=False)
    run_preview.click(lambda *v: _preview(ext, *v), [image, module, res, a, b, pixel_perfect], preview, queue=False)
    send_size.click(None, js=SEND_SIZE_JS.replace("PREFIX", prefix).replace("TAB", tab))
    parts = {"enabled": enabled, "image": encoded, "module": module, "model": model, "weight": weight,
             "guidance_start": start, "guidance_end": end, "processor_res": res, "threshold_a": a, "threshold_b": b,
             "pixel_perfect": pixel_perfect, "control_mode": control_mode, "resize_mode": resize_mode,
             "union_control_type": union_type}
    return {f"u{n}_{name}": component for name, component in parts.items()}


def controlnet_section(ext: Any, tab: str) -> api.UISectionSpec:
    def build(context: Any) -> dict:
        import gradio as gr

        components: dict[str, Any] = {}
        with gr.Tabs():
            for n in range(ext.unit_count):
                with gr.Tab(f"ControlNet Unit {n}"):
                    components.update(_unit_tab(ext, tab, n))
        return components

    return api.UISectionSpec("controlnet", "ControlNet", tabs=(tab,), build=build, order=50,
                             paste=lambda fields: pasted_units(ext, fields))


PASTED = ("module", "model", "weight", "guidance_start", "guidance_end", "processor_res", "threshold_a",
          "threshold_b", "pixel_perfect", "control_mode", "resize_mode")


def _model_title(ext: Any, name: str) -> str | None:
    """The model dropdown's title for an infotext's model ("name [hash]" or "name"), None when not here."""
    if name in ("None", "none", ""):
        return "None"
    titles = model_titles(ext, ext.hashes)
    stem = name.split(" [")[0]
    return next((t for t in titles if t == name), None) or next((t for t in titles if t.split(" [")[0] == stem), None)


def pasted_units(ext: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """`ControlNet N: "Module: ..., Model: ..."` infotext fields -> the unit tabs' values (`u<N>_<field>`).

    Units the infotext does not name are disabled; a model that is not installed is left out, with a warning."""
    import gradio as gr

    values: dict[str, Any] = {}
    for n in range(ext.unit_count):
        text = fields.get(f"ControlNet {n}")
        if text is None:
            values[f"u{n}_enabled"] = False
            continue
        unit = parse_infotext(str(text))
        values[f"u{n}_enabled"] = True
        for name in PASTED:
            if name in unit:
                values[f"u{n}_{name}"] = unit[name]
        if "module" in unit and preprocessors.find(str(unit["module"])) is None:
            values.pop(f"u{n}_module")
            gr.Warning(f"ControlNet unit {n}: preprocessor {unit['module']!r} is not known here")
        if "model" in unit:
            title = _model_title(ext, str(unit["model"]))
            if title is None:
                values.pop(f"u{n}_model")
                gr.Warning(f"ControlNet unit {n}: model {unit['model']!r} is not in models/ControlNet")
            else:
                values[f"u{n}_model"] = title
        if int(values.get(f"u{n}_processor_res", 512)) < 64:  # -1: the preprocessor has no resolution
            values.pop(f"u{n}_processor_res")
    return values
