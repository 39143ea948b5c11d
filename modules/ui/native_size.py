"""Width and height follow the loaded model's native size (its spec's `default_size`) until the user sets them.

Each generation tab keeps a `gr.State` flag, set when the user moves its width or height; the page
load and every checkpoint switch load the model (through the worker, as a job would) and update the
sizes of the tabs whose flag is still unset.
"""
from __future__ import annotations

import logging

import gradio as gr

from modules.errors import AtelierError
from modules.ui.context import UIContext

log = logging.getLogger(__name__)
TABS = ("txt2img", "img2img")
# The page says whether an update is in flight (body[data-native-size] "pending" or "applied"), for scripts
# and browser tests: the page load and the checkpoint change it causes can overlap, so updates are counted.
NATIVE_SIZE_START = ("() => { const d = document.body.dataset; d.nativeSizePending = String((+d.nativeSizePending || 0)"
                     " + 1); d.nativeSize = 'pending'; }")
NATIVE_SIZE_DONE = ("() => { const d = document.body.dataset; const n = Math.max(0, (+d.nativeSizePending || 1) - 1);"
                    " d.nativeSizePending = String(n); if (n === 0) d.nativeSize = 'applied'; }")


def native_size(ui: UIContext, title: str | None) -> int | None:
    """The native side in pixels of checkpoint `title` (default: the current one), loaded first if needed."""
    server = ui.server
    name = title or server.options.get("sd_model_checkpoint")
    if name:
        info = server.find_checkpoint(str(name))
        if info is not None:
            try:
                server.executor.load_model(info.name)
            except AtelierError as err:  # the job will say so; the sizes stay as they are
                log.warning("could not load %s for its native size: %s", info.name, err)
    model = ui.app.engine.models.current
    return model.spec.default_size if model is not None else None


def size_updates(size: int | None, per_tab: list[tuple[bool, float, float, int]]) -> list:
    """(width, height, last applied) updates per tab, in TABS order. A tab keeps its sizes when the user
    moved them, or when they are no longer the ones last applied (typed while the model loaded)."""
    out: list = []
    for user_set, width, height, last in per_tab:
        keep = size is None or user_set or (width, height) != (last, last)
        out += [gr.skip(), gr.skip(), gr.skip()] if keep else [size, size, size]
    return out


def wire_native_size(ui: UIContext, blocks: gr.Blocks, checkpoint: gr.Dropdown) -> None:
    """The flags, set by the user's own edits; updates on page load and after a checkpoint switch."""
    inputs, outputs = [], []
    for name in TABS:
        fields = ui.tabs[name].fields
        flag, last = gr.State(False), gr.State(int(fields["width"].value))  # the built default (square)
        for widget in (fields["width"], fields["height"]):
            widget.input(lambda: True, outputs=flag, queue=False, show_progress="hidden")
        inputs += [flag, fields["width"], fields["height"], last]
        outputs += [fields["width"], fields["height"], last]

    loaded = gr.State(None)

    def load_model(title: str | None) -> int | None:
        return native_size(ui, title)

    def apply(size: int | None, *values) -> list:  # reads the flags and sizes after the (slow) load
        per_tab = [tuple(values[i:i + 4]) for i in range(0, len(values), 4)]
        return size_updates(size, per_tab)

    for event in (blocks.load, checkpoint.change):
        event(None, js=NATIVE_SIZE_START, queue=False).then(
            load_model, inputs=checkpoint, outputs=loaded, show_progress="hidden", concurrency_limit=1,
            concurrency_id="native-size").then(apply, inputs=[loaded, *inputs], outputs=outputs,
                                                 show_progress="hidden", queue=False
                                                 ).then(None, js=NATIVE_SIZE_DONE)
