"""Steps, CFG, Distilled CFG, sampler and schedule follow the loaded model's family until the user sets them.

FLUX.1 and SD3.5 have their own presets (`families.defaults`, as Forge's: FLUX.1-dev 20 steps, CFG 1,
Distilled CFG 3.5, Euler / Simple; schnell and Large Turbo 4 steps, CFG 1); SD models get the values
the page was built with. As for the native size (native_size.py), each tab keeps per field a flag set by
the user's own edits and the value last applied; a field is updated on page load and after a checkpoint
switch only while its flag is unset and it still shows the value last applied (a pasted infotext wins).
"""
from __future__ import annotations

import gradio as gr

from modules.checkpoints.families import defaults
from modules.ui.context import UIContext
from modules.ui.native_size import TABS, native_size

FIELDS = ("steps", "cfg_scale", "distilled_cfg_scale", "sampler_name", "scheduler")
# After each update the page says so (body[data-model-defaults="applied"]), for scripts and browser tests.
DEFAULTS_DONE = "() => { document.body.dataset.modelDefaults = 'applied'; }"


def model_defaults(ui: UIContext, title: str | None) -> dict[str, object]:
    """The loaded (after loading `title`) model's family defaults; {} for SD models."""
    native_size(ui, title)  # loads the checkpoint as the job would
    model = ui.app.engine.models.current
    return defaults(model.spec.family) if model is not None else {}


def default_updates(wanted: dict[str, object], built: dict[str, object],
                    per_field: list[tuple[str, bool, object, object]]) -> list:
    """(value, last applied) updates per (name, user set, value, last applied). The target is the family's
    default, else the value the page was built with; a field the user set or changed since keeps its value."""
    out: list = []
    for name, user_set, value, last in per_field:
        target = wanted.get(name, built[name])
        if user_set or value != last or value == target:
            out += [gr.skip(), gr.skip()]
        else:
            out += [target, target]
    return out


def wire_model_defaults(ui: UIContext, blocks: gr.Blocks, checkpoint: gr.Dropdown) -> None:
    """Flags set by the user's edits; updates after the page loads and after each checkpoint switch."""
    inputs, outputs, names, built = [], [], [], {}
    for tab in TABS:
        fields = ui.tabs[tab].fields
        for name in FIELDS:
            if name not in fields:
                continue
            widget = fields[name]
            built[name] = widget.value
            flag, last = gr.State(False), gr.State(widget.value)
            widget.input(lambda: True, outputs=flag, queue=False, show_progress="hidden")
            inputs += [flag, widget, last]
            outputs += [widget, last]
            names.append(name)
    loaded = gr.State({})

    def apply(wanted: dict, *values) -> list:
        per_field = [(names[i], *values[3 * i:3 * i + 3]) for i in range(len(names))]
        return default_updates(wanted or {}, built, per_field)

    for event in (blocks.load, checkpoint.change):
        event(lambda title: model_defaults(ui, title), inputs=checkpoint, outputs=loaded, show_progress="hidden",
              concurrency_limit=1, concurrency_id="native-size"
              ).then(apply, inputs=[loaded, *inputs], outputs=outputs, show_progress="hidden", queue=False
                     ).then(None, js=DEFAULTS_DONE)
