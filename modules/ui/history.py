"""The History tab: the user's own past jobs from the job store; open one to see its images."""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from modules.ui.context import UIContext
from modules.ui.results import finished_message, infotext_html, result_state

COLUMNS = ("When", "Kind", "State", "Images", "Prompt")


@dataclass
class HistoryTab:
    refresh: gr.Button
    table: gr.Dataframe
    gallery: gr.Gallery
    infotext: gr.HTML
    state: gr.State  # the selected job's result state (same shape as a generation tab's)
    job_ids: gr.State
    send: dict[str, gr.Button]


def history_rows(ui: UIContext, request) -> tuple[list[list], list[str]]:
    jobs = ui.server.jobs.list(ui.caller(request), owner="me", limit=100)
    rows = []
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created))
        count = len(job.result.images) if job.result else 0
        prompt = str((job.params.get("params") or {}).get("prompt", ""))[:120]
        rows.append([when, job.kind, job.state, count, prompt])
    return rows, [job.id for job in jobs]


def empty_history_text(ui: UIContext, request) -> str:
    """Why the list is empty: history is kept per signed-in user, or per browser without --gradio-auth."""
    caller = ui.caller(request)
    if ui.server.config.credentials:
        return (f"No jobs yet for **{caller.owner}**. History is kept per signed-in user: the jobs you run "
                "appear here, in any browser you sign in from.")
    return ("No jobs yet in this browser. History is kept per signed-in user; without sign-in each browser "
            "is its own user (a cookie). Start Atelier with `--gradio-auth user:password` to keep it across "
            "browsers.")


def build_history_tab(ui: UIContext) -> HistoryTab:
    with gr.Tab("History", id="history", elem_id="tab-history") as tab:
        refresh = gr.Button("Refresh", size="sm", elem_id="history-refresh")
        why = gr.Markdown("", elem_id="history-why")
        table = gr.Dataframe(headers=list(COLUMNS), value=[], interactive=False, wrap=True, elem_id="history-table")
        with gr.Row():
            gallery = gr.Gallery(label="Images", columns=4, height=300, object_fit="contain", interactive=False,
                                 elem_id="history-gallery")
            with gr.Column():
                message = gr.Markdown("", elem_id="history-message")
                infotext = gr.HTML("", elem_id="history-infotext")
                with gr.Row():
                    send = {name: gr.Button(label, size="sm", elem_id=f"history-send-to-{name}")
                            for name, label in (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"),
                                                ("extras", "Send to extras"))}
    state = gr.State({"images": [], "infotexts": [], "seeds": [], "selected": 0})
    job_ids = gr.State([])

    def load(request: gr.Request):
        rows, ids = history_rows(ui, request)
        return rows, ids, "" if rows else empty_history_text(ui, request)

    def open_job(ids: list[str], evt: gr.SelectData, request: gr.Request):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(ids):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        job = ui.server.jobs.get(ids[row], ui.caller(request))
        result = result_state(job)
        gallery_items = [(p, f"Seed: {s}") for p, s in zip(result["images"], result["seeds"], strict=False)]
        first = result["infotexts"][0] if result["infotexts"] else ""
        return gallery_items, infotext_html(first), finished_message(job), result

    refresh.click(load, outputs=[table, job_ids, why], queue=False)
    tab.select(load, outputs=[table, job_ids, why], queue=False)
    table.select(open_job, inputs=job_ids, outputs=[gallery, infotext, message, state], queue=False)

    def pick(result: dict, evt: gr.SelectData):
        result = {**result, "selected": evt.index if isinstance(evt.index, int) else 0}
        texts = result.get("infotexts") or []
        return result, infotext_html(texts[result["selected"]] if result["selected"] < len(texts) else "")

    gallery.select(pick, inputs=state, outputs=[state, infotext], queue=False)
    return HistoryTab(refresh, table, gallery, infotext, state, job_ids, send)
