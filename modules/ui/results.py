"""Results of a generation tab: live progress, preview, gallery with infotext, send-to and download."""
from __future__ import annotations

import html
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from modules.jobs.model import CANCELLED, DONE, FAILED, Job
from modules.ui.follow import Update


@dataclass
class ResultsPanel:
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.HTML
    message: gr.Markdown
    state: gr.State  # {"images": [paths], "infotexts": [...], "seeds": [...], "selected": int}
    send: dict[str, gr.Button]
    download: gr.DownloadButton
    open_folder: gr.Button


def results_panel(tab: str) -> ResultsPanel:
    progress = gr.HTML("", elem_id=f"{tab}-progress", elem_classes=["atelier-progress-box"])
    message = gr.Markdown("", elem_id=f"{tab}-message")
    preview = gr.Image(label="Live preview", type="pil", interactive=False, visible=False, height=256,
                       elem_id=f"{tab}-preview")
    gallery = gr.Gallery(label="Output", columns=4, height=360, object_fit="contain", interactive=False,
                         elem_id=f"{tab}-gallery")
    with gr.Row():
        send = {name: gr.Button(label, size="sm", elem_id=f"{tab}-send-to-{name}")
                for name, label in (("img2img", "Send to img2img"), ("inpaint", "Send to inpaint"),
                                    ("extras", "Send to extras"), ("pnginfo", "Send to PNG info"))}
        download = gr.DownloadButton("Download", size="sm", elem_id=f"{tab}-download")
        open_folder = gr.Button("📂 Open folder", size="sm", elem_id=f"{tab}-open-folder")
    infotext = gr.HTML("", elem_id=f"{tab}-infotext", elem_classes=["atelier-infotext"])
    state = gr.State({"images": [], "infotexts": [], "seeds": [], "selected": 0})
    return ResultsPanel(progress, preview, gallery, infotext, message, state, send, download, open_folder)


def _seconds(value: float | None) -> str:
    if value is None:
        return "…"
    value = int(round(value))
    return f"{value // 60}m {value % 60:02d}s" if value >= 60 else f"{value}s"


def progress_html(update: Update) -> str:
    """The progress bar: queue position while waiting, then step, batch and ETA."""
    job = update.job
    if job.state == "queued":
        ahead = update.position or 0
        text = "Waiting: your job is next" if ahead == 0 else \
            f"Waiting: {ahead} job{'s' if ahead != 1 else ''} ahead of you"
        return _bar(0.0, text, "queued")
    p = job.progress
    batch = f" · batch {p.job_no + 1}/{p.job_count}" if p.job_count > 1 else ""
    if p.text:  # a script: "cell 3/12"
        batch = f" · {p.text}"
    text = f"Step {p.step}/{p.steps}{batch} · ETA {_seconds(update.eta)}" if p.steps else "Starting…"
    return _bar(p.fraction, text, "running")


def _bar(fraction: float, text: str, state: str) -> str:
    percent = max(0.0, min(fraction, 1.0)) * 100
    return (f"<div class='atelier-progress' data-state='{state}' data-percent='{percent:.1f}'>"
            f"<div class='atelier-progress-fill' style='width:{percent:.1f}%'></div>"
            f"<span class='atelier-progress-text'>{html.escape(text)}</span></div>")


def preview_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


def infotext_html(text: str) -> str:
    return f"<pre class='atelier-infotext-text'>{html.escape(text)}</pre>" if text else ""


def finished_message(job: Job) -> str:
    """A readable line for how a job ended (errors never include a stack trace)."""
    if job.state == FAILED:
        return f"❌ **Error:** {job.error or 'the job failed'}"
    if job.state == CANCELLED:
        return "⏹ Cancelled."
    if job.state == DONE and job.result and job.result.interrupted:
        return f"⏹ Interrupted: kept {len(job.result.images)} image(s)."
    warnings = job.result.warnings if job.result else []
    return "\n".join(f"⚠ {w}" for w in warnings)


def result_state(job: Job) -> dict[str, Any]:
    result = job.result
    if result is None:
        return {"images": [], "infotexts": [], "seeds": [], "selected": 0, "job": job.id}
    return {"images": list(result.images), "infotexts": list(result.infotexts), "seeds": list(result.seeds),
            "selected": 0, "job": job.id}


def selected(state: dict[str, Any]) -> tuple[str | None, str]:
    """(image path, infotext) of the selected result."""
    images, texts = state.get("images") or [], state.get("infotexts") or []
    index = min(max(int(state.get("selected") or 0), 0), max(len(images) - 1, 0))
    path = images[index] if images else None
    return path, texts[index] if index < len(texts) else ""


def open_folder(folder: Path, local_only_ok: bool) -> str:
    """Open the output folder in the desktop's file manager: only when the UI runs on this machine."""
    if not local_only_ok:
        return "Opening folders only works when Atelier listens on this machine only (not with --listen)."
    folder.mkdir(parents=True, exist_ok=True)
    opener = shutil.which("xdg-open") or shutil.which("open")
    if opener is None or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or opener.endswith("/open")):
        return f"No file manager available here; the images are in `{folder}`."
    subprocess.Popen([opener, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    return f"Opened `{folder}`."
