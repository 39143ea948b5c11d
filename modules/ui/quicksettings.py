"""Quicksettings in the top bar beside the checkpoint (A1111's `quicksettings_list`): each change applies
at once to new jobs. The list is a setting; it is read when the page is built (at start-up)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.errors import AtelierError
from modules.jobs.overrides import COMPONENT_OPTIONS
from modules.server.options import READ_ONLY
from modules.ui.context import UIContext
from modules.ui.options_ui import (
    DEFAULT_QUICKSETTINGS,
    component_widget,
    info_of,
    may_change,
    option_keys,
    option_widget,
    save_options,
)


def quicksettings_keys(ui: UIContext) -> list[str]:
    """The configured list (unknown names left out); the checkpoint is always there, as its own dropdown."""
    wanted = ui.server.options.get("quicksettings_list", list(DEFAULT_QUICKSETTINGS))
    if not isinstance(wanted, list | tuple):
        wanted = [part.strip() for part in str(wanted).split(",")]
    known = set(option_keys(ui))
    return [key for key in wanted if key in known]


def build_quicksettings(ui: UIContext) -> dict[str, gr.components.Component]:
    """The top-bar widgets by option key; the VAE / text encoder ones are wired by `wire_components`."""
    widgets = {}
    for key in quicksettings_keys(ui):
        widget = widgets[key] = option_widget(ui, key, f"quicksettings-{key}", compact=True)
        if key in READ_ONLY or key in COMPONENT_OPTIONS:
            continue

        def apply(value: Any, request: gr.Request, key: str = key) -> None:
            if not may_change(ui, request):
                gr.Warning("Only admin users (--admin-users) may change the settings.")
                return
            message = save_options(ui, {key: value})
            if message.startswith("**Not saved"):
                gr.Warning(message.replace("**", ""))
            else:
                gr.Info(f"{info_of(key).label}: {value} (new jobs use it)")

        widget.input(apply, inputs=widget, show_progress="hidden", trigger_mode="always_last")
    return widgets


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: [str(x) for x in v or []]) if isinstance(a, list | tuple) or isinstance(b, list | tuple) \
        else (lambda v: v or "Automatic")
    return norm(a) == norm(b)


def wire_components(ui: UIContext, checkpoint: gr.Dropdown, refresh: gr.Button, status: gr.Markdown) -> None:
    """SD VAE and the VAE / Text Encoder picker: save the choice (new jobs use it), then load the shown
    checkpoint with it so that a missing part is reported now, in `status`; the choice is kept either way
    (a picker is filled one file at a time). `refresh` re-reads their file lists."""
    for key in COMPONENT_OPTIONS:
        if key in ui.quicksettings:
            _wire_component(ui, key, ui.quicksettings[key], checkpoint, refresh, status)


def _wire_component(ui: UIContext, key: str, widget: gr.Dropdown, checkpoint: gr.Dropdown, refresh: gr.Button,
                    status: gr.Markdown) -> None:
    label = info_of(key).label

    def apply(value: Any, title: str | None, request: gr.Request) -> Any:
        if _same(value, ui.server.options.get(key)):
            return gr.update()
        if not may_change(ui, request):
            return "⚠ Only admin users (--admin-users) may change the settings."
        message = save_options(ui, {key: value})
        if message.startswith("**Not saved"):
            return f"⚠ {message}"
        info = ui.server.find_checkpoint(title or ui.server.options.get("sd_model_checkpoint") or "")
        if info is None:
            return f"{label} saved; new jobs use it."
        try:
            ui.server.executor.load_model(info.name, ui.server.components())
        except AtelierError as err:
            return f"❌ **{label} saved, but {info.name} could not be loaded with it:** {err}"
        ui.server.options.update({"sd_model_checkpoint": ui.server.title(info)})
        return f"✅ Loaded {info.name} with {label}: {_shown(value)}"

    widget.change(apply, inputs=[widget, checkpoint], outputs=status, show_progress="minimal",
                  trigger_mode="always_last", concurrency_limit=1)

    def relist(current: Any) -> dict:
        fresh = component_widget(ui, key, current, {})
        return gr.update(choices=fresh.choices, value=current)

    refresh.click(relist, inputs=widget, outputs=widget, queue=False)


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "the checkpoint's own parts"
    return str(value)
