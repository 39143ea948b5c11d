"""Steps, CFG, Distilled CFG, sampler and schedule follow the loaded model's family until the user sets them.

FLUX.1 and SD3.5 have their own presets (`families.defaults`, as Forge's: FLUX.1-dev 20 steps, CFG 1,
Distilled CFG 3.5, Euler / Simple; schnell and Large Turbo 4 steps, CFG 1); SD models get the values
the page was built with. The mechanism is the native size's (native_size.py): the page load and each
checkpoint switch load the model and put its family's presets in a hidden JSON, then the browser decides
and writes in one step (`atelierFollowModel`). A field the user edited (any trusted input event, even a
number not yet entered), or that no longer shows the value last applied (a pasted infotext), keeps its
value, so a value set while the model is still loading is never overwritten.
"""
from __future__ import annotations

import json

import gradio as gr

from modules.checkpoints.families import defaults
from modules.ui.context import UIContext
from modules.ui.native_size import TABS, native_size, progress_js

FIELDS = ("steps", "cfg_scale", "distilled_cfg_scale", "sampler_name", "scheduler")
# body[data-model-defaults] is "pending" while an update is in flight, then "applied".
DEFAULTS_START, DEFAULTS_DONE = progress_js("modelDefaults")


def model_defaults(ui: UIContext, title: str | None) -> dict[str, object]:
    """The loaded (after loading `title`) model's family defaults; {} for SD models."""
    native_size(ui, title)  # loads the checkpoint as the job would
    model = ui.app.engine.models.current
    return defaults(model.spec.family) if model is not None else {}


def follow_js(names: list[str], widgets: list[gr.components.Component]) -> str:
    """The browser-side apply: (presets, *current values) -> one value or a skip (undefined) per widget. A field
    without a preset takes the value the page was built with; each field is kept or followed on its own."""
    ids = json.dumps([w.elem_id for w in widgets])
    built = json.dumps([w.value for w in widgets])
    return (f"(wanted, ...current) => {{ const built = {built}; const targets = {json.dumps(names)}.map("
            f"(name, i) => (wanted || {{}})[name] ?? built[i]); return window.atelierFollowModel ? "
            f"window.atelierFollowModel({ids}, {ids}, built, targets, current) : targets; }}")


def wire_model_defaults(ui: UIContext, blocks: gr.Blocks, checkpoint: gr.Dropdown) -> None:
    """Updates after the page loads and after each checkpoint switch; the browser skips the fields the user set."""
    fields = [(name, ui.tabs[tab].fields[name]) for tab in TABS for name in FIELDS if name in ui.tabs[tab].fields]
    names, widgets = [name for name, _ in fields], [widget for _, widget in fields]
    loaded = gr.JSON({}, visible="hidden", elem_id="model-defaults-loaded")

    for event in (blocks.load, checkpoint.change):
        event(None, js=DEFAULTS_START, queue=False).then(
            lambda title: model_defaults(ui, title), inputs=checkpoint, outputs=loaded, show_progress="hidden",
            concurrency_limit=1, concurrency_id="native-size"
        ).then(None, inputs=[loaded, *widgets], outputs=widgets, js=follow_js(names, widgets),
               show_progress="hidden", queue=False).then(None, js=DEFAULTS_DONE)
