"""create_ui: composes the tabs; every tab lives in its own module."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from modules.ui.checkpoints import build_checkpoint_row
from modules.ui.context import UIContext
from modules.ui.hints import ui_config_html

CSS_PATH = Path(__file__).with_name("style.css")


def create_ui(ui: UIContext) -> gr.Blocks:
    """The whole page: checkpoint row, then the tabs; tabs are linked by send-to buttons."""
    from modules.ui.extensions_tab import build_extension_tabs, build_extensions_tab
    from modules.ui.extras_tab import build_extras_tab
    from modules.ui.history import build_history_tab
    from modules.ui.img2img import build_img2img_tab
    from modules.ui.model_defaults import wire_model_defaults
    from modules.ui.native_size import wire_native_size
    from modules.ui.pnginfo import build_pnginfo_tab
    from modules.ui.sendto import wire_send_to
    from modules.ui.settings_tab import build_settings_tab
    from modules.ui.txt2img import build_txt2img_tab

    with gr.Blocks(title="Atelier", analytics_enabled=False) as blocks:
        ui_config = gr.HTML(ui_config_html(ui.server.options), elem_id="atelier-ui-config")
        checkpoint = build_checkpoint_row(ui)
        with gr.Tabs(elem_id="tabs") as tabs:
            ui.tabs["txt2img"] = build_txt2img_tab(ui, checkpoint)
            ui.tabs["img2img"] = build_img2img_tab(ui, checkpoint)
            ui.tabs["extras"] = build_extras_tab(ui)
            ui.tabs["pnginfo"] = build_pnginfo_tab(ui)
            ui.tabs["history"] = build_history_tab(ui)
            ui.tabs["settings"] = build_settings_tab(ui)
            ui.tabs["extensions"] = build_extensions_tab(ui)
            build_extension_tabs(ui)
        wire_send_to(ui, tabs, checkpoint)
        blocks.load(lambda: on_page_load(ui), outputs=[checkpoint, *default_widgets(ui)], queue=False)
        wire_native_size(ui, blocks, checkpoint)
        wire_model_defaults(ui, blocks, checkpoint)
        blocks.load(lambda: ui_config_html(ui.server.options), outputs=ui_config, queue=False)
    return blocks


def default_widgets(ui: UIContext) -> list:
    return [ui.tabs[name].fields[field] for name in ("txt2img", "img2img") for field in ("sampler_name", "scheduler")]


def on_page_load(ui: UIContext) -> list:
    """Fresh values for each page load: the checkpoint list and the default sampler and schedule."""
    titles = ui.checkpoint_titles()
    checkpoint = gr.update(choices=ui.checkpoint_choices(), value=ui.current_checkpoint() if titles else None)
    defaults = [ui.default("sampler", "DPM++ 2M"), ui.default("scheduler", "Automatic")]
    return [checkpoint, *defaults, *defaults]
