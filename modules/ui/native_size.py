"""Width and height follow the loaded model's native size (its spec's `default_size`) until the user sets them.

The page load and every checkpoint switch load the model (through the worker, as a job would) and put its
native size in a hidden number; then the browser decides and writes the sizes in one step, with no round
trip (`atelierFollowModel` in atelier.js): a tab whose width or height the user has edited (any trusted
input event in it, even a number not yet entered), or that no longer shows the size last applied (a
pasted infotext, the swap button), keeps its sizes. A size the user types while the model is still
loading is therefore never overwritten.
"""
from __future__ import annotations

import json
import logging

import gradio as gr

from modules.errors import AtelierError
from modules.ui.context import UIContext

log = logging.getLogger(__name__)
TABS = ("txt2img", "img2img")


def progress_js(key: str) -> tuple[str, str]:
    """(start, done) scripts: the page says whether an update is in flight (body[data-<key>] "pending" or
    "applied"), for scripts and browser tests; the page load and the checkpoint change it causes can overlap,
    so updates are counted."""
    count = f"d.{key}Pending"
    start = f"() => {{ const d = document.body.dataset; {count} = String((+{count} || 0) + 1); d.{key} = 'pending'; }}"
    done = (f"() => {{ const d = document.body.dataset; const n = Math.max(0, (+{count} || 1) - 1); {count} = String(n);"
            f" if (n === 0) d.{key} = 'applied'; }}")
    return start, done


NATIVE_SIZE_START, NATIVE_SIZE_DONE = progress_js("nativeSize")


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


def follow_js(widgets: list[gr.components.Component]) -> str:
    """The browser-side apply: (size, *current values) -> one value or a skip (undefined) per widget."""
    ids = json.dumps([w.elem_id for w in widgets])
    groups = json.dumps([w.elem_id.split("-")[0] for w in widgets])  # a tab's width and height go together
    built = json.dumps([w.value for w in widgets])  # what the page was built with: the first "last applied"
    return (f"(size, ...current) => window.atelierFollowModel ? window.atelierFollowModel({ids}, {groups}, "
            f"{built}, current.map(() => size), current) : current.map(() => size ?? undefined)")


def wire_native_size(ui: UIContext, blocks: gr.Blocks, checkpoint: gr.Dropdown) -> None:
    """Updates on page load and after a checkpoint switch; the browser skips the fields the user set."""
    widgets = [ui.tabs[name].fields[key] for name in TABS for key in ("width", "height")]
    loaded = gr.Number(None, visible="hidden", elem_id="native-size-loaded", interactive=False)

    def load_model(title: str | None) -> int | None:
        return native_size(ui, title)

    for event in (blocks.load, checkpoint.change):
        event(None, js=NATIVE_SIZE_START, queue=False).then(
            load_model, inputs=checkpoint, outputs=loaded, show_progress="hidden", concurrency_limit=1,
            concurrency_id="native-size").then(None, inputs=[loaded, *widgets], outputs=widgets,
                                                 js=follow_js(widgets), show_progress="hidden", queue=False
                                                 ).then(None, js=NATIVE_SIZE_DONE)
