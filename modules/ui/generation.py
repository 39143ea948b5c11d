"""A generation tab (txt2img or img2img): prompts, parameters, extension sections, results, events.

The tab-specific part (img2img's image inputs) is passed in as `build_inputs`; everything here
binds widgets to params fields by name through `Fields`.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.errors import AtelierError, InvalidParams
from modules.jobs.model import Caller, Job
from modules.ui import components as ui_components
from modules.ui import prompts as prompt_events
from modules.ui.bindings import Fields, field_defaults
from modules.ui.context import UIContext
from modules.ui.follow import follow
from modules.ui.jobs import interrupt_mine, params_class, readable, submit
from modules.ui.results import (
    ResultsPanel,
    finished_message,
    infotext_html,
    preview_image,
    progress_html,
    result_state,
    results_panel,
)
from modules.ui.scripts import ScriptPanel, render_scripts
from modules.ui.sections import render_sections, section_components, section_values

# build_inputs(fields) renders the tab's own inputs and returns (extra input components, collect)
# where collect({component: value}) -> (kind, extra field values, images by field name).
Collect = Callable[[dict], tuple[str, dict[str, Any], dict[str, Any]]]


@dataclass
class GenerationTab:
    name: str
    fields: Fields
    panel: ui_components.ParamsPanel
    results: ResultsPanel
    sections: dict[str, dict[str, Any]]
    extra_inputs: set = field(default_factory=set)
    handles: dict[str, Any] = field(default_factory=dict)  # tab-specific components (img2img images)
    scripts: ScriptPanel | None = None  # the Script dropdown and its controls


def build_generation_tab(ui: UIContext, name: str, kind: str, checkpoint: gr.Dropdown,
                         build_inputs: Callable[[Fields], tuple[set, Collect, dict]] | None = None) -> GenerationTab:
    registries = ui.app.registries
    defaults = field_defaults(params_class(kind))
    defaults.update(sampler_name=ui.default("sampler", "DPM++ 2M"), scheduler=ui.default("scheduler", "Automatic"))
    samplers, schedules = registries.samplers.names(), registries.schedulers.names()
    fields = Fields()
    extra_inputs, collect, handles = set(), None, {}
    with gr.Row():
        with gr.Column(scale=1):
            prompts = ui_components.prompt_area(name, registries.styles.names(), fields)
            if build_inputs is not None:
                extra_inputs, collect, handles = build_inputs(fields)
            ui_components.sampler_row(name, samplers, schedules, defaults, fields)
            swap = ui_components.size_rows(name, defaults, fields, ui.app.settings.max_size)
            seed = ui_components.seed_row(name, fields)
            if kind == "txt2img":
                ui_components.hires_accordion(name, samplers, schedules, registries.upscalers.names(), fields)
            refiner_refresh = ui_components.refiner_accordion(name, ui.checkpoint_titles(), fields)
            sections = render_sections(ui.app, kind)
            scripts = render_scripts(ui.app, kind)
        with gr.Column(scale=1, elem_id=f"{name}-results", elem_classes=["atelier-results"]):
            actions = ui_components.action_buttons(name)
            results = results_panel(name)
    panel = ui_components.ParamsPanel(fields, prompts, actions, seed, swap)
    tab = GenerationTab(name, fields, panel, results, sections, extra_inputs, handles, scripts)
    refiner_refresh.click(lambda current: gr.update(choices=[ui_components.NO_REFINER, *ui.checkpoint_titles()],
                                                    value=current), inputs=fields["refiner_checkpoint"],
                          outputs=fields["refiner_checkpoint"], queue=False)
    _wire(ui, tab, kind, defaults, checkpoint, collect)
    return tab


def _wire(ui: UIContext, tab: GenerationTab, kind: str, defaults: dict, checkpoint: gr.Dropdown,
          collect: Collect | None) -> None:
    fields, results, panel = tab.fields, tab.results, tab.panel
    prompt_events.wire_prompt_area(ui, tab.name, panel.prompts, fields, defaults, checkpoint)
    panel.seed.random.click(lambda: -1, outputs=fields["seed"], queue=False)
    panel.seed.reuse.click(_reuse_seed, inputs=results.state, outputs=fields["seed"], queue=False)
    panel.swap_size.click(lambda w, h: (h, w), inputs=[fields["width"], fields["height"]],
                          outputs=[fields["width"], fields["height"]], queue=False)
    inputs = set(fields.values()) | tab.extra_inputs | section_components(tab.sections) | {checkpoint}
    if tab.scripts is not None:
        inputs |= tab.scripts.components()
    outputs = [results.progress, results.preview, results.gallery, results.infotext, results.message,
               results.state, results.download]

    async def generate(data: dict, request: gr.Request) -> AsyncIterator[dict]:
        async for out in _run(ui, tab, kind, defaults, data, request, collect, checkpoint):
            yield out

    panel.actions.generate.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None,
                                 show_progress="hidden")
    def interrupt(request: gr.Request) -> str:
        return _interrupt(ui, request, False)

    def skip(request: gr.Request) -> str:
        return _interrupt(ui, request, True)

    panel.actions.interrupt.click(interrupt, outputs=results.message, queue=False)
    panel.actions.skip.click(skip, outputs=results.message, queue=False)
    results.gallery.select(_select, inputs=results.state, outputs=[results.state, results.infotext,
                                                                   results.download], queue=False)
    results.open_folder.click(lambda: _open_folder(ui, kind), outputs=results.message, queue=False)


async def _run(ui: UIContext, tab: GenerationTab, kind: str, defaults: dict, data: dict, request: gr.Request,
               collect: Collect | None, checkpoint: gr.Dropdown) -> AsyncIterator[dict]:
    """Submit the tab's job, then stream its progress, previews and result from job events."""
    results = tab.results
    caller = ui.caller(request)
    try:
        job = await asyncio.to_thread(_submit_tab, ui, tab, kind, defaults, data, caller, collect, checkpoint)
    except (AtelierError, InvalidParams) as err:
        yield {results.message: f"❌ **Error:** {readable(err)}", results.progress: "",
               results.preview: gr.update(visible=False)}
        return
    except Exception as err:  # never a stack trace in the page
        yield {results.message: f"❌ **Error:** {readable(err)}", results.progress: ""}
        return
    yield {results.message: "", results.gallery: [], results.infotext: ""}
    update, size = None, output_size(job)
    async for update in follow(ui.server, ui.events(), caller, job.id, ui.preview_every()):
        out: dict = {results.progress: progress_html(update)}
        if update.preview is not None:
            out[results.preview] = gr.update(value=preview_image(update.preview, size), visible=True)
        if not update.job.is_finished:
            yield out
    yield await asyncio.to_thread(_finished, results, update.job)


def output_size(job: Job) -> tuple[int, int] | None:
    """The job's output width x height (previews are scaled to it), when its params say."""
    params = (job.params or {}).get("params") or {}
    width, height = params.get("width"), params.get("height")
    return (int(width), int(height)) if isinstance(width, int) and isinstance(height, int) else None


def _submit_tab(ui: UIContext, tab: GenerationTab, kind: str, defaults: dict, data: dict, caller: Caller,
                collect: Collect | None, checkpoint: gr.Dropdown) -> Job:
    """Read the tab's widgets by field name and queue the job (runs in a worker thread)."""
    values = ui_components.same_as_none(tab.fields.read(data, defaults))
    values["styles"] = tuple(values.get("styles") or ())
    job_kind, images = kind, {}
    if collect is not None:
        job_kind, extra, images = collect(data)
        values.update(extra)
    values["extension_args"] = section_values(tab.sections, data)
    script = tab.scripts.values(data) if tab.scripts is not None else None
    return submit(ui.server, caller, job_kind, values, images, data.get(checkpoint), script)


def _finished(results: ResultsPanel, job) -> dict:
    state = result_state(job)
    gallery = [(path, f"Seed: {seed}") for path, seed in zip(state["images"], state["seeds"], strict=False)]
    first_text = state["infotexts"][0] if state["infotexts"] else ""
    return {results.progress: "", results.preview: gr.update(visible=False, value=None), results.gallery: gallery,
            results.infotext: infotext_html(first_text), results.message: finished_message(job),
            results.state: state, results.download: state["images"][0] if state["images"] else None}


def _reuse_seed(state: dict) -> int:
    seeds = state.get("seeds") or []
    index = min(int(state.get("selected") or 0), max(len(seeds) - 1, 0))
    return seeds[index] if seeds else -1


def _select(state: dict, evt: gr.SelectData) -> tuple:
    state = {**state, "selected": evt.index if isinstance(evt.index, int) else 0}
    images, texts = state.get("images") or [], state.get("infotexts") or []
    index = min(state["selected"], max(len(images) - 1, 0))
    text = texts[index] if index < len(texts) else ""
    return state, infotext_html(text), images[index] if images else None


def _interrupt(ui: UIContext, request: gr.Request, skip: bool) -> str:
    caller = ui.caller(request)
    reached = interrupt_mine(ui.server, caller, skip)
    if reached:
        return "⏭ Skipping to the next batch…" if skip else "⏹ Interrupting your job…"
    cancelled = 0
    if not skip:
        for job in ui.server.jobs.active(caller):
            ui.server.jobs.cancel(job.id, caller)
            cancelled += 1
    return f"⏹ Cancelled {cancelled} queued job(s)." if cancelled else "You have no running job."


def _open_folder(ui: UIContext, kind: str) -> str:
    from modules.ui.results import open_folder

    return open_folder(ui.app.settings.outputs_dir / f"{kind}-images", ui.local_only)
