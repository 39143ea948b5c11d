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


def size_updates(size: int | None, touched: list[bool]) -> list:
    """(width, height) updates per tab, in TABS order; a tab the user sized keeps its values."""
    out: list = []
    for user_set in touched:
        value = gr.skip() if size is None or user_set else size
        out += [value, value]
    return out


def wire_native_size(ui: UIContext, blocks: gr.Blocks, checkpoint: gr.Dropdown) -> None:
    """The flags, set by the user's own edits; updates on page load and after a checkpoint switch."""
    flags, sizes = [], []
    for name in TABS:
        fields = ui.tabs[name].fields
        flag = gr.State(False)
        for widget in (fields["width"], fields["height"]):
            widget.input(lambda: True, outputs=flag, queue=False, show_progress="hidden")
            sizes.append(widget)
        flags.append(flag)

    loaded = gr.State(None)

    def load_model(title: str | None) -> int | None:
        return native_size(ui, title)

    def apply(size: int | None, *touched: bool) -> list:  # reads the flags after the (slow) load
        return size_updates(size, list(touched))

    for event in (blocks.load, checkpoint.change):
        event(load_model, inputs=checkpoint, outputs=loaded, show_progress="hidden", concurrency_limit=1,
              concurrency_id="native-size").then(apply, inputs=[loaded, *flags], outputs=sizes,
                                                 show_progress="hidden", queue=False)
