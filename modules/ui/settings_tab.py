"""The Settings tab: every server option by A1111-like section, a search box, Apply settings and Reload UI.

Options are saved to config.json (atomically) and used by new jobs; start-up settings are read-only.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from modules.ui.context import UIContext
from modules.ui.options_ui import SECTIONS, info_of, may_change, option_keys, option_widget, save_options


@dataclass
class SettingsTab:
    widgets: dict[str, gr.components.Component]  # option key -> widget
    save: gr.Button
    message: gr.Markdown
    search: gr.Textbox
    reload: gr.Button


def _startup_info(ui: UIContext) -> str:
    s = ui.app.settings
    return "\n".join([
        "**Set at start-up** (command-line flags; restart to change):",
        f"- Output folders: `{s.outputs_dir / 'txt2img-images'}`, `{s.outputs_dir / 'img2img-images'}` "
        "(`--outputs-dir`)",
        "- File names: `YYYY-MM-DD/NNNNN-SEED.png`, numbered as A1111 numbers them",
        f"- Precision: `{ui.app.devices.dtype}` on `{ui.app.devices.device}` (`--precision fp32|bf16|fp16`)",
    ])


def matches(query: str, key: str) -> bool:
    """The search: every word of the query in the option's label, key or section."""
    info = info_of(key)
    text = f"{info.label} {key} {info.section}".lower()
    return all(word in text for word in (query or "").lower().split())


def build_settings_tab(ui: UIContext) -> SettingsTab:
    keys = option_keys(ui)
    widgets: dict[str, gr.components.Component] = {}
    sections: dict[str, gr.Accordion] = {}
    with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
        problem = ui.server.options.load_error
        gr.Markdown(f"**{problem}**" if problem else "", elem_id="settings-load-error")
        with gr.Row(equal_height=True):
            save = gr.Button("Apply settings", variant="primary", elem_id="settings-save", scale=1)
            reload = gr.Button("Reload UI", elem_id="settings-reload", scale=1)
            search = gr.Textbox(placeholder="Search settings", show_label=False, elem_id="settings-search",
                                scale=3, max_lines=1)
        message = gr.Markdown("", elem_id="settings-message")
        for section in SECTIONS:
            in_section = [k for k in keys if info_of(k).section == section]
            if not in_section:
                continue
            slug = section.lower().replace(" ", "-")
            with gr.Accordion(section, open=True, elem_id=f"settings-section-{slug}") as accordion:
                for key in in_section:
                    widgets[key] = option_widget(ui, key, f"setting-{key}")
            sections[section] = accordion
        gr.Markdown(_startup_info(ui))

    by_component = {component: key for key, component in widgets.items()}

    def apply(data: dict, request: gr.Request) -> str:
        if not may_change(ui, request):
            return "**Not saved:** only admin users (`--admin-users`) may change the settings."
        return save_options(ui, {by_component[c]: v for c, v in data.items() if c in by_component})

    def filter_settings(query: str) -> list:
        shown = {key: matches(query, key) for key in widgets}
        updates = [gr.update(visible=shown[key]) for key in widgets]
        updates += [gr.update(visible=any(shown[k] for k in widgets if info_of(k).section == s)) for s in sections]
        return updates

    save.click(apply, inputs=set(widgets.values()), outputs=message)
    search.change(filter_settings, inputs=search, outputs=[*widgets.values(), *sections.values()],
                 queue=False, show_progress="hidden", trigger_mode="always_last")
    reload.click(None, js="() => { window.location.reload(); }")
    return SettingsTab(widgets, save, message, search, reload)
