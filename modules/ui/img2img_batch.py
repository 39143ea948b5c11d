"""img2img's "Batch" mode (A1111): every image of an input folder, with an optional inpaint mask of the
same name from a mask folder, is one img2img job of the same settings; results go to an output folder
under the input's name. Folder rules: `modules.server.batch_dirs` (docs/webui.md)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from modules.errors import AtelierError
from modules.jobs.model import DONE, Caller
from modules.server import batch_dirs
from modules.ui import components as ui_components
from modules.ui.bindings import field_defaults
from modules.ui.context import UIContext
from modules.ui.generation import GenerationTab
from modules.ui.jobs import params_class, readable


def build_batch_inputs(handles: dict[str, Any]) -> None:
    gr.Markdown("Process the images of a folder, each as its own job with the settings below. On a shared "
                "server (--listen) the folders must be inside your own batch folder.", elem_id="img2img-batch-help")
    handles["batch_input"] = gr.Textbox(label="Input directory", elem_id="img2img-batch-input")
    handles["batch_output"] = gr.Textbox(label="Output directory", elem_id="img2img-batch-output",
                                         placeholder="Leave blank to save images to the default path.")
    handles["batch_mask"] = gr.Textbox(label="Inpaint batch mask directory (required for inpaint batch processing "
                                             "only)", elem_id="img2img-batch-mask")
    handles["batch_run"] = gr.Button("Generate batch", variant="primary", elem_id="img2img-batch-run")
    handles["batch_status"] = gr.Markdown("", elem_id="img2img-batch-status")


def wire_batch(ui: UIContext, tab: GenerationTab, checkpoint: gr.Dropdown) -> None:
    handles = tab.handles
    defaults = field_defaults(params_class("img2img"))
    folders = (handles["batch_input"], handles["batch_output"], handles["batch_mask"])

    async def run(data: dict, request: gr.Request) -> AsyncIterator[str]:
        caller = ui.caller(request)
        try:
            values = ui_components.same_as_none(tab.fields.read(data, defaults))
            values["styles"] = tuple(values.get("styles") or ())
            dirs = batch_dirs.resolve_dirs(ui.server, caller, *(data.get(box) or "" for box in folders))
            jobs = await asyncio.to_thread(batch_dirs.submit_batch, ui.server, caller, values, dirs,
                                           data.get(checkpoint))
        except AtelierError as err:
            yield f"❌ **Error:** {readable(err)}"
            return
        yield f"Queued {len(jobs)} job(s), one per image."
        async for text in _follow(ui, caller, jobs, dirs.output):
            yield text

    handles["batch_run"].click(run, inputs={*tab.fields.values(), checkpoint, *folders},
                               outputs=handles["batch_status"], concurrency_limit=None)


async def _follow(ui: UIContext, caller: Caller, jobs: list, output) -> AsyncIterator[str]:
    """Wait for each job in turn; copy its images to the output folder as it ends."""
    saved, failed = 0, []
    for done, (source, job) in enumerate(jobs, start=1):
        finished = await asyncio.to_thread(ui.server.jobs.wait, job.id)
        if finished.state == DONE:
            saved += len(await asyncio.to_thread(batch_dirs.copy_outputs, finished, source, output))
        else:
            failed.append(f"{source.name}: {finished.error or finished.state}")
        yield f"{done}/{len(jobs)} done, {saved} image(s) saved to `{output}`"
    summary = f"✅ Batch finished: {saved} image(s) saved to `{output}`."
    if failed:
        summary += "\n\n❌ " + "\n\n❌ ".join(failed)
    yield summary
