"""The checkpoint dropdown and refresh button at the top of the page."""
from __future__ import annotations

import gradio as gr

from modules.errors import AtelierError
from modules.server.sdapi import set_options_and_model
from modules.ui.context import UIContext


def build_checkpoint_row(ui: UIContext) -> gr.Dropdown:
    with gr.Row(elem_id="checkpoint-row"):
        titles = ui.checkpoint_titles()
        dropdown = gr.Dropdown(titles, value=ui.current_checkpoint() if titles else None,
                               label="Stable Diffusion checkpoint", elem_id="checkpoint", scale=4,
                               allow_custom_value=True)  # titles gain a hash once a model was hashed
        refresh = gr.Button("🔄", size="sm", scale=0, min_width=40, elem_id="checkpoint-refresh")
        status = gr.Markdown("" if titles else _none_found(ui), elem_id="checkpoint-status")

    def refresh_list(current: str | None):
        titles = ui.checkpoint_titles()
        value = current if current in titles else (ui.current_checkpoint() if titles else None)
        return gr.update(choices=titles, value=value), "" if titles else _none_found(ui)

    def switch(title: str | None, progress=gr.Progress()):  # noqa: B008 (Gradio's progress injection)
        info = ui.server.find_checkpoint(title) if title else None
        if info is None or ui.server.title(info) == ui.current_checkpoint():
            return ""
        progress(0.1, desc=f"Loading {title}…")
        try:
            set_options_and_model(ui.server, {"sd_model_checkpoint": title})
        except AtelierError as err:
            return f"❌ **Could not load {title}:** {err}"
        return f"✅ Loaded {title}"

    refresh.click(refresh_list, inputs=dropdown, outputs=[dropdown, status], queue=False)
    dropdown.change(switch, inputs=dropdown, outputs=status, concurrency_limit=1)
    return dropdown


def _none_found(ui: UIContext) -> str:
    folder = ui.app.settings.models_dir / "Stable-diffusion"
    return f"⚠ No checkpoint found. Put a model in `{folder}` and press 🔄."
