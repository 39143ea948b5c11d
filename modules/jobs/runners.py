"""Job payload -> engine call, on the executor's worker. The payload was validated when it was submitted."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from modules.jobs.inputs import load_inputs
from modules.jobs.payload import JobPayload
from modules.jobs.script_runs import run_script
from modules.pipeline.extras import ExtrasJobParams, run_extras


def job_params(payload: JobPayload, outdir: Path | None = None):
    """The typed params the job runs with: input images loaded, the executor's output folder set."""
    params = payload.params
    images = load_inputs(payload.inputs)
    if images or outdir is not None:
        params = dataclasses.replace(params, **images, **({"outdir": outdir} if outdir is not None else {}))
    return params


def run(engine, payload: JobPayload, control, on_progress, outdir: Path | None = None, load_model=None):
    """Run one job on `engine` (on the worker thread) and return the engine's Result.

    A job with a script runs the script, which calls the engine once per cell; `load_model(name)`
    (on this worker) lets it switch checkpoints between cells."""
    params = job_params(payload, outdir)
    if payload.script:
        return run_script(engine, payload.kind, payload.script, params, payload.checkpoint, control, on_progress,
                          load_model)
    if isinstance(params, ExtrasJobParams):
        return run_extras(engine.registries, params, control, on_progress)
    return engine.generate(params, control, on_progress)


def save_job_images(result, folder: Path) -> list[Path]:
    """Save a result's images (with infotext) under the job's own folder, atomically."""
    from modules import images as image_files

    return [image_files.save_image(image, folder, seed, text)
            for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=False)]
