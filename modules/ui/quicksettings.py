"""Quicksettings in the top bar beside the checkpoint (A1111's `quicksettings_list`): each change applies
at once to new jobs. The list is a setting; it is read when the page is built (at start-up)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.server.options import READ_ONLY
from modules.ui.context import UIContext
from modules.ui.options_ui import (
    DEFAULT_QUICKSETTINGS,
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
    widgets = {}
    for key in quicksettings_keys(ui):
        widget = widgets[key] = option_widget(ui, key, f"quicksettings-{key}", compact=True)
        if key in READ_ONLY:
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
