"""The Extras tab (A1111's): upscale one image, uploaded files, or a folder, with one or two upscalers.

Each run is one "extras" job on the caller's queue (the same submit service as generation), so
it is interruptible and in the caller's history; results are then saved to the chosen folder.

Batch from directory reads and writes folders on the server, so it is fenced: with the UI on
this machine only (127.0.0.1) and an admin caller (everyone, without logins) any folder may be
used; otherwise only folders inside the outputs folder, after resolving links and `..`.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from starlette.concurrency import run_in_threadpool

from modules import images as image_files
from modules.errors import AtelierError, InvalidParams
from modules.jobs.model import FAILED, Job
from modules.jobs.submit import Submission
from modules.ui.context import UIContext
from modules.ui.jobs import interrupt_mine

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_BATCH = 1000
MODES = ("Single Image", "Batch Process", "Batch from Directory")
PARAM_FIELDS = ("upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop", "upscaler_1",
                "upscaler_2", "extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility",
                "codeformer_weight")


@dataclass
class ExtrasTab:
    name: str
    image: gr.Image
    gallery: gr.Gallery
    info: gr.HTML
    message: gr.Markdown
    fields: dict[str, Any]


def batch_folder(text: str, allowed: Path, unrestricted: bool, what: str) -> Path:
    """The resolved folder for `text`; InvalidParams when it is outside `allowed` (unless unrestricted)."""
    if not text.strip():
        raise InvalidParams(f"Enter the {what} folder")
    folder = Path(text.strip()).expanduser().resolve()
    root = allowed.resolve()
    if not unrestricted and folder != root and root not in folder.parents:
        raise InvalidParams(f"The {what} folder must be inside {root} (other folders only when Atelier "
                            "listens on 127.0.0.1 and you are an admin)")
    return folder


def folder_images(folder: Path) -> list[tuple[str, Image.Image]]:
    if not folder.is_dir():
        raise InvalidParams(f"Input folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:MAX_BATCH]
    if not paths:
        raise InvalidParams(f"Input folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, _load(p)) for p in paths]


def _load(path: Path | str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError) as err:
        raise InvalidParams(f"{Path(path).name} is not an image Pillow can read: {err}") from None


def _inputs(ui: UIContext, mode: str, image: Any, files: Any, input_dir: str, unrestricted: bool
            ) -> list[tuple[str, Image.Image]]:
    if mode == MODES[0]:
        if image is None:
            raise InvalidParams("Upload an image first")
        return [("image", image)]
    if mode == MODES[1]:
        if not files:
            raise InvalidParams("Upload some images first")
        return [(Path(str(f)).name, _load(getattr(f, "name", f))) for f in files][:MAX_BATCH]
    allowed = ui.app.settings.outputs_dir
    return folder_images(batch_folder(input_dir, allowed, unrestricted, "input"))


def extras_values(values: dict[str, Any]) -> dict[str, Any]:
    """The tab's widgets -> the Extras job's fields by name."""
    fields = {name: values[name] for name in PARAM_FIELDS}
    for name in ("upscaling_resize_w", "upscaling_resize_h"):
        fields[name] = int(fields[name] or 0)
    fields["upscaler_1"], fields["upscaler_2"] = fields["upscaler_1"] or "None", fields["upscaler_2"] or "None"
    return {**fields, "resize_mode": 1 if values["resize_mode"] == "Scale to" else 0}


def _output_folder(ui: UIContext, values: dict[str, Any], unrestricted: bool) -> Path:
    outputs = ui.app.settings.outputs_dir
    if values["mode"] == MODES[2] and (values["output_dir"] or "").strip():
        return batch_folder(values["output_dir"], outputs, unrestricted, "output")
    return outputs / "extras-images"


async def process(ui: UIContext, request: Any, values: dict[str, Any], progress: Any = None
                  ) -> tuple[list, str, str]:
    """(gallery images, infotext HTML, message): one Extras job on the caller's queue; saves the results."""
    caller = ui.caller(request)
    unrestricted = ui.local_only and ui.server.is_admin(caller)
    try:
        named = _inputs(ui, values["mode"], values["image"], values["files"], values["input_dir"] or "",
                        unrestricted)
        outdir = _output_folder(ui, values, unrestricted)
        submission = Submission("extras", extras_values(values), {"init_images": [im for _, im in named]},
                                source="ui")
        job = await run_in_threadpool(ui.server.submitter.submit, caller, submission)
        job = await _follow(ui, job, caller, progress)
        if job.state == FAILED or job.result is None:
            return [], "", f"⚠️ {job.error or 'The Extras job failed.'}"
        results = [_load(path) for path in job.result.images]
        info = job.result.infotexts[-1] if job.result.infotexts else ""
        for (_, original), result in zip(named, results, strict=False):
            image_files.save_image(result, outdir, 0, image_files.read_infotext(original) or info or None)
    except AtelierError as err:
        return [], "", f"⚠️ {err}"
    html_info = f"<pre class='atelier-infotext-text'>{html.escape(info)}</pre>" if info else ""
    stopped = " (interrupted)" if job.result.interrupted else ""
    return results, html_info, f"Done{stopped}: {len(results)} image(s) saved to `{_shown(ui, outdir)}`."


async def _follow(ui: UIContext, job: Job, caller: Any, progress: Any) -> Job:
    """Wait for the job, reporting its per-tile progress."""
    async for item in ui.events().stream(job.id, caller, keepalive=60.0):
        current = item[1] if item is not None else None
        if current is None:
            continue
        if current.is_finished:
            return current
        step, steps = current.progress.step, current.progress.steps
        if progress is not None and steps:
            progress((step, steps), desc=f"Image {current.progress.job_no + 1}: tiles")
    return ui.server.jobs.get(job.id, caller)


def _shown(ui: UIContext, folder: Path) -> str:
    outputs, shown = ui.app.settings.outputs_dir.resolve(), folder.resolve()
    return f"outputs/{shown.relative_to(outputs)}" if shown == outputs or outputs in shown.parents else str(shown)


def build_extras_tab(ui: UIContext) -> ExtrasTab:
    upscalers = [s.name for s in ui.app.registries.upscalers if not s.is_latent]
    fields: dict[str, Any] = {}
    with gr.Tab("Extras", id="extras", elem_id="tab-extras"):
        with gr.Row():
            with gr.Column():
                mode = gr.Radio(list(MODES), value=MODES[0], label="Source", elem_id="extras-mode")
                # png: an image sent here from another tab reaches the upscaler losslessly (Gradio's default is webp)
                image = gr.Image(label="Source", type="pil", height=320, elem_id="extras-image",
                                 sources=["upload", "clipboard"], format="png")
                files = gr.File(label="Batch Process", file_count="multiple", file_types=["image"],
                                elem_id="extras-batch-files")
                input_dir = gr.Textbox(label="Input directory", elem_id="extras-input-dir")
                output_dir = gr.Textbox(label="Output directory (empty: outputs/extras-images)",
                                        elem_id="extras-output-dir")
                _resize_and_upscalers(fields, upscalers)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="extras-generate")
                    interrupt = gr.Button("Interrupt", elem_id="extras-interrupt")
            with gr.Column():
                message = gr.Markdown("", elem_id="extras-message")
                gallery = gr.Gallery(label="Result", columns=2, height=360, object_fit="contain",
                                     interactive=False, elem_id="extras-gallery")
                info = gr.HTML("", elem_id="extras-info")

    sources = {"mode": mode, "image": image, "files": files, "input_dir": input_dir, "output_dir": output_dir}

    async def handler(data: dict, request: gr.Request, progress=gr.Progress()) -> tuple[list, str, str]:  # noqa: B008
        values = {name: data[component] for name, component in {**sources, **fields}.items()}
        return await process(ui, request, values, progress)

    def stop(request: gr.Request) -> str:
        count = interrupt_mine(ui.server, ui.caller(request))
        return "⏹ Interrupting…" if count else "Nothing of yours is running."

    interrupt.click(stop, outputs=message, queue=False)
    run.click(handler, inputs={*sources.values(), *fields.values()}, outputs=[gallery, info, message])
    return ExtrasTab("extras", image, gallery, info, message, fields)


def _resize_and_upscalers(fields: dict[str, Any], upscalers: list[str]) -> None:
    fields["resize_mode"] = gr.Radio(["Scale by", "Scale to"], value="Scale by", label="Resize",
                                     elem_id="extras-resize-mode")
    with gr.Row():
        fields["upscaling_resize"] = gr.Slider(1, 8, value=4, step=0.05, label="Resize",
                                               elem_id="extras-upscaling-resize")
        fields["upscaling_resize_w"] = gr.Number(512, label="Width", precision=0, elem_id="extras-resize-w")
        fields["upscaling_resize_h"] = gr.Number(512, label="Height", precision=0, elem_id="extras-resize-h")
        fields["upscaling_crop"] = gr.Checkbox(True, label="Crop to fit", elem_id="extras-crop")
    with gr.Row():
        fields["upscaler_1"] = gr.Dropdown(upscalers, value="None", label="Upscaler 1", elem_id="extras-upscaler-1")
        fields["upscaler_2"] = gr.Dropdown(upscalers, value="None", label="Upscaler 2", elem_id="extras-upscaler-2")
        fields["extras_upscaler_2_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                                           elem_id="extras-upscaler-2-visibility")
    with gr.Accordion("Face restoration (needs GFPGAN / CodeFormer weights in models/GFPGAN, models/Codeformer)",
                      open=False):
        fields["gfpgan_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility",
                                                elem_id="extras-gfpgan-visibility")
        fields["codeformer_visibility"] = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                                                    elem_id="extras-codeformer-visibility")
        fields["codeformer_weight"] = gr.Slider(0, 1, value=0, step=0.001,
                                                label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                                elem_id="extras-codeformer-weight")
