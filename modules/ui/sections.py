"""Extension UI sections rendered into the generation tabs, from modules/plugins/ui.py's specs.

Each section's values reach the job as `extension_args[section.name][option name]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.plugins.jobhooks import extension_args_from_infotext
from modules.plugins.specs import OptionSpec, UISectionSpec
from modules.plugins.ui import sections_for_tab

log_prefix = "extension section"


@dataclass(frozen=True)
class UIBuildContext:
    """What an extension's `build(context)` gets: the App and the tab being built."""

    app: Any
    tab: str


def option_component(spec: OptionSpec, elem_id: str) -> gr.components.Component:
    kwargs = {"label": spec.label, "elem_id": elem_id}
    if spec.kind == "checkbox":
        return gr.Checkbox(bool(spec.default), **kwargs)
    if spec.kind == "slider":
        return gr.Slider(spec.minimum if spec.minimum is not None else 0,
                         spec.maximum if spec.maximum is not None else 1,
                         value=spec.default, step=spec.step, **kwargs)
    if spec.kind == "dropdown":
        return gr.Dropdown(list(spec.choices), value=spec.default, **kwargs)
    if spec.kind == "text":
        return gr.Textbox(str(spec.default or ""), **kwargs)
    return gr.Number(spec.default, minimum=spec.minimum, maximum=spec.maximum, **kwargs)


def render_sections(app: Any, tab: str) -> dict[str, dict[str, gr.components.Component]]:
    """Render every section for `tab`; returns {section name: {option name: component}}.

    A section whose `build` fails is shown as an error message and recorded on its extension.
    """
    rendered: dict[str, dict[str, Any]] = {}
    for spec in sections_for_tab(app.plugins, app.registries, tab):
        with gr.Accordion(spec.title, open=False, elem_id=f"{tab}-ext-{spec.name}"):
            rendered[spec.name] = _section(app, tab, spec)
    return rendered


def _section(app: Any, tab: str, spec: UISectionSpec) -> dict[str, Any]:
    components = {o.name: option_component(o, f"{tab}-ext-{spec.name}-{o.name}") for o in spec.options}
    if spec.build is not None:
        try:
            built = spec.build(UIBuildContext(app, tab)) or {}
            components.update({str(k): v for k, v in dict(built).items()})
        except Exception as err:  # one broken extension never breaks the UI
            app.plugins.record("register_ui_sections", spec.name, err)
            gr.Markdown(f"⚠ This section failed to build: {type(err).__name__}: {err}")
    return components


def section_values(rendered: dict[str, dict[str, Any]], data: dict) -> dict[str, dict[str, Any]]:
    """{component: value} -> extension_args; a section whose Enable box is off is left out."""
    args: dict[str, dict[str, Any]] = {}
    for name, components in rendered.items():
        values = {option: data[c] for option, c in components.items() if c in data}
        if values.get("enabled") is False:
            continue
        if values:
            args[name] = values
    return args


def section_components(rendered: dict[str, dict[str, Any]]) -> set:
    return {c for components in rendered.values() for c in components.values()}


def pasted_updates(app: Any, tab: str, rendered: dict[str, dict[str, Any]],
                   fields: dict[str, Any]) -> dict[Any, Any]:
    """{component: value} restoring the sections from parsed infotext: declared options by their infotext
    keys, and whatever each section's `paste(fields)` returns. A failing `paste` is recorded and skipped."""
    declared = extension_args_from_infotext(app.plugins, app.registries, {k: str(v) for k, v in fields.items()}, tab)
    updates: dict[Any, Any] = {}
    for spec in sections_for_tab(app.plugins, app.registries, tab):
        components = rendered.get(spec.name) or {}
        values = dict(declared.get(spec.name, {}))
        if values and "enabled" in components:
            values.setdefault("enabled", True)
        if spec.paste is not None:
            try:
                values.update(spec.paste(dict(fields)) or {})
            except Exception as err:  # one broken extension never breaks the UI
                app.plugins.record("register_ui_sections", spec.name, err)
        updates.update({components[name]: value for name, value in values.items() if name in components})
    return updates
