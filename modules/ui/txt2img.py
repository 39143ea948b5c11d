"""The txt2img tab."""
from __future__ import annotations

import gradio as gr

from modules.ui.context import UIContext
from modules.ui.generation import GenerationTab, build_generation_tab


def build_txt2img_tab(ui: UIContext, checkpoint: gr.Dropdown) -> GenerationTab:
    with gr.Tab("txt2img", id="txt2img", elem_id="tab-txt2img"):
        return build_generation_tab(ui, "txt2img", "txt2img", checkpoint)
