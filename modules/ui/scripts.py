"""The Script dropdown at the bottom of txt2img and img2img, with the chosen script's controls.

Controls come from each `ScriptSpec.options` (data, the same ones the API's positional
`script_args` follow); the chosen script's values reach the job as `script` by option name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.plugins.scripts import ScriptFill, ScriptSpec, option_choices
from modules.plugins.specs import OptionSpec
from modules.ui.components import icon_button
from modules.ui.sections import option_component

NONE = "None"


@dataclass
class ScriptPanel:
    dropdown: gr.Dropdown
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)  # script name -> option name -> component

    def components(self) -> set:
        return {self.dropdown} | {c for controls in self.controls.values() for c in controls.values()}

    def values(self, data: dict) -> dict[str, Any] | None:
        """The chosen script and its arguments by option name; None when no script is chosen."""
        name = data.get(self.dropdown)
        if not name or name == NONE or name not in self.controls:
            return None
        args = {option: data[c] for option, c in self.controls[name].items() if c in data}
        return {"name": name, "args": args}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _control(spec: OptionSpec, choices: list[str] | None, elem_id: str) -> Any:
    if spec.kind == "html":
        gr.Markdown(spec.label, elem_id=elem_id)
        return None
    if spec.kind == "multiselect":  # without fixed choices (X/Y/Z values) API clients fill it; the UI hides it
        value = [v for v in (spec.default or []) if v in (choices or [])]
        return gr.Dropdown(choices or [], value=value, multiselect=True, allow_custom_value=not choices,
                           label=spec.label, elem_id=elem_id, visible=bool(choices))
    if choices is not None and spec.kind == "dropdown":
        value = spec.default if spec.default in choices else (choices[0] if choices else None)
        return gr.Dropdown(choices, value=value, label=spec.label, elem_id=elem_id)
    return option_component(spec, elem_id)


def _render(app: Any, tab: str, spec: ScriptSpec) -> dict[str, Any]:
    choices = option_choices(spec, tab, app.registries)
    controls, buttons = {}, {}
    for option in spec.options:
        elem_id = f"{tab}-script-{_slug(spec.name)}-{option.name}"
        if option.name in spec.fill_buttons and spec.fill is not None:
            with gr.Row(equal_height=True):
                component = _control(option, choices.get(option.name), elem_id)
                buttons[option.name] = icon_button("\u2630", f"{elem_id}-fill")
        else:
            component = _control(option, choices.get(option.name), elem_id)
        if component is not None:
            controls[option.name] = component
    for name, button in buttons.items():
        _wire_fill(app, tab, spec, controls, name, button)
    return controls


def _wire_fill(app: Any, tab: str, spec: ScriptSpec, controls: dict[str, Any], option: str, button: Any) -> None:
    """The "fill values" button: the option's box gets what the script's `fill` returns for the current args."""
    names = {component: name for name, component in controls.items()}

    def fill(data: dict) -> Any:
        args = {names[c]: value for c, value in data.items() if c in names}
        checkpoints = tuple(info.name for info in app.engine.checkpoints())
        try:
            text = spec.fill(ScriptFill(tab, option, args, app.registries, checkpoints))
        except Exception as err:  # a broken extension's button never breaks the page
            app.plugins.record("register_scripts", spec.name, err)
            return gr.skip()
        return text if text is not None else gr.skip()

    button.click(fill, inputs=set(controls.values()), outputs=controls[option], queue=False)


def render_scripts(app: Any, tab: str) -> ScriptPanel:
    """The Script dropdown and one hidden group of controls per script; choosing shows that group."""
    specs = [s for s in app.registries.scripts if tab in s.tabs]
    dropdown = gr.Dropdown([NONE, *(s.name for s in specs)], value=NONE, label="Script", elem_id=f"{tab}-script")
    panel, groups = ScriptPanel(dropdown), []
    for spec in specs:
        with gr.Column(visible=False, elem_id=f"{tab}-script-{_slug(spec.name)}") as group:
            try:
                panel.controls[spec.name] = _render(app, tab, spec)
            except Exception as err:  # one broken extension never breaks the UI
                app.plugins.record("register_scripts", spec.name, err)
                gr.Markdown(f"⚠ This script's controls failed to build: {type(err).__name__}: {err}")
                panel.controls[spec.name] = {}
        groups.append((spec.name, group))

    def show(name: str) -> list:
        return [gr.update(visible=name == script) for script, _ in groups]

    dropdown.change(show, inputs=dropdown, outputs=[g for _, g in groups], queue=False)
    return panel
