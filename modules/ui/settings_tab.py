"""The Settings tab: per-job defaults saved to config.json (atomically); start-up settings shown read-only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.errors import AtelierError
from modules.server.options import RNG_LABELS
from modules.settings import EMPHASIS_MODES
from modules.ui.components import AUTOMATIC
from modules.ui.context import UIContext


@dataclass
class SettingsTab:
    widgets: dict[str, gr.components.Component]  # option key -> widget
    save: gr.Button
    message: gr.Markdown


def _startup_info(ui: UIContext) -> str:
    s = ui.app.settings
    return "\n".join([
        "**Set at start-up** (command-line flags; restart to change):",
        f"- Output folders: `{s.outputs_dir / 'txt2img-images'}`, `{s.outputs_dir / 'img2img-images'}` "
        "(`--outputs-dir`)",
        "- File names: `YYYY-MM-DD/NNNNN-SEED.png`, numbered as A1111 numbers them",
        f"- Precision: `{ui.app.devices.dtype}` on `{ui.app.devices.device}` (`--precision fp32|bf16|fp16`)",
    ])


def option_widgets(ui: UIContext) -> dict[str, gr.components.Component]:
    o, registries = ui.server.options, ui.app.registries
    return {
        "show_progress_every_n_steps": gr.Slider(1, 50, value=o.get("show_progress_every_n_steps", 1), step=1,
                                                 label="Live preview every N steps",
                                                 elem_id="settings-preview-every"),
        "live_previews_enable": gr.Checkbox(bool(o.get("live_previews_enable", True)), label="Show live previews"),
        "atelier_default_sampler": gr.Dropdown(registries.samplers.names(),
                                               value=ui.default("sampler", "DPM++ 2M"), label="Default sampler"),
        "atelier_default_scheduler": gr.Dropdown([AUTOMATIC, *registries.schedulers.names()],
                                                 value=ui.default("scheduler", AUTOMATIC),
                                                 label="Default schedule type"),
        "randn_source": gr.Radio(list(RNG_LABELS.values()), value=o.get("randn_source", "GPU"),
                                 label="Random number generator source"),
        "CLIP_stop_at_last_layers": gr.Slider(1, 12, value=o.get("CLIP_stop_at_last_layers", 1), step=1,
                                              label="Clip skip"),
        "emphasis": gr.Radio(list(EMPHASIS_MODES), value=o.get("emphasis", "Original"), label="Emphasis mode"),
        "eta_noise_seed_delta": gr.Number(o.get("eta_noise_seed_delta", 0), precision=0,
                                          label="Eta noise seed delta (ENSD)"),
    }


def save_options(ui: UIContext, values: dict[str, Any]) -> str:
    changes = {k: int(v) if k in ("show_progress_every_n_steps", "CLIP_stop_at_last_layers",
                                  "eta_noise_seed_delta") and v is not None else v
               for k, v in values.items()}
    try:
        ui.server.options.update(changes)
    except (AtelierError, OSError) as err:
        return f"❌ Not saved: {err}"
    return f"✅ Saved to `{ui.server.options.path.name}`. New jobs use these settings."


def build_settings_tab(ui: UIContext) -> SettingsTab:
    with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
        problem = ui.server.options.load_error
        gr.Markdown(f"⚠ **{problem}**" if problem else "", elem_id="settings-load-error")
        widgets = option_widgets(ui)
        save = gr.Button("Apply settings", variant="primary", elem_id="settings-save")
        message = gr.Markdown("", elem_id="settings-message")
        gr.Markdown(_startup_info(ui))

    keys = {component: key for key, component in widgets.items()}

    def apply(data: dict, request: gr.Request) -> str:
        server = ui.server
        if server.config.credentials and server.config.admin_users and not ui.caller(request).admin:
            return "❌ Only admin users (`--admin-users`) may change the settings."
        return save_options(ui, {keys[c]: v for c, v in data.items() if c in keys})

    save.click(apply, inputs=set(widgets.values()), outputs=message, queue=False)
    return SettingsTab(widgets, save, message)
