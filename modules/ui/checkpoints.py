"""The checkpoint dropdown and refresh button at the top of the page."""
from __future__ import annotations

import gradio as gr

from modules.demo import DEMO_CHECKPOINT, DEMO_RESOLUTION
from modules.errors import AtelierError
from modules.server.sdapi import set_options_and_model
from modules.ui.context import UIContext
from modules.ui.quicksettings import build_quicksettings, wire_components


def build_checkpoint_row(ui: UIContext) -> gr.Dropdown:
    with gr.Row(elem_id="checkpoint-row"):
        titles = ui.checkpoint_titles()
        dropdown = gr.Dropdown(ui.checkpoint_choices(), value=ui.current_checkpoint() if titles else None,
                               label="Stable Diffusion checkpoint", elem_id="checkpoint", scale=3,
                               allow_custom_value=True)  # titles gain a hash once a model was hashed
        refresh = gr.Button("\u21bb", size="sm", scale=0, min_width=36, elem_id="checkpoint-refresh",
                            elem_classes=["atelier-icon-button"])
        ui.quicksettings = build_quicksettings(ui)
    status = gr.Markdown(_status(ui, ui.current_checkpoint() if titles else None), elem_id="checkpoint-status",
                         elem_classes=["atelier-collapse-empty"])
    wire_components(ui, dropdown, refresh, status)

    def refresh_list(current: str | None):
        titles = ui.checkpoint_titles()
        value = current if current in titles else (ui.current_checkpoint() if titles else None)
        return gr.update(choices=ui.checkpoint_choices(), value=value), _status(ui, value)

    def switch(title: str | None, progress=gr.Progress()):  # noqa: B008 (Gradio's progress injection)
        info = ui.server.find_checkpoint(title) if title else None
        if info is None or ui.server.title(info) == ui.current_checkpoint():
            return _status(ui, title)
        progress(0.1, desc=f"Loading {title}…")
        try:
            set_options_and_model(ui.server, {"sd_model_checkpoint": title})
        except AtelierError as err:
            return f"❌ **Could not load {title}:** {err}"
        return f"✅ Loaded {title}" + (f"\n\n{demo_notice(ui)}" if is_demo(title) else "")

    refresh.click(refresh_list, inputs=dropdown, outputs=[dropdown, status], queue=False)
    dropdown.change(switch, inputs=dropdown, outputs=status, concurrency_limit=1)
    return dropdown


def is_demo(title: str | None) -> bool:
    return bool(title) and str(title).startswith(DEMO_CHECKPOINT.stem)


def demo_notice(ui: UIContext) -> str:
    folder = ui.app.settings.checkpoint_dir
    return (f"ℹ This is Atelier's small **demo model** (coloured shapes, {DEMO_RESOLUTION}×{DEMO_RESOLUTION}; "
            f"try \"a red circle on a blue background, top left\"). For real images, put Stable Diffusion "
            f"1.x, 2.x or SDXL checkpoints (`.safetensors` single files, or diffusers folders) in `{folder}` "
            "and press the refresh button (\u21bb).")


def _status(ui: UIContext, title: str | None) -> str:
    if not title:
        return _none_found(ui)
    return demo_notice(ui) if is_demo(title) else ""


def _none_found(ui: UIContext) -> str:
    folder = ui.app.settings.checkpoint_dir
    return f"⚠ No checkpoint found. Put a model in `{folder}` and press 🔄."
