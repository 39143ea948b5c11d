"""A task is a composition of stages; `run_task` runs one over a job, batch by batch.

    inputs (once) -> per batch: passes (conditioning -> sampling, [upscale -> conditioning ->
    sampling]) -> decode -> postprocess -> save

A pass takes the previous pass's `Sampled` and returns a new one; the loop runs the
next pass only while no pass has stopped (`Sampled.stop`), and starts no batch once
the job is interrupted.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from modules.pipeline.control import INTERRUPT
from modules.pipeline.hooks import DECODE, INPUTS, POSTPROCESS, SAVE
from modules.pipeline.job import Batch, Job, batches
from modules.pipeline.params import Result
from modules.pipeline.sampling import Sampled, SamplingPlan
from modules.pipeline.stages import Decoded, InfotextFields, Saved, decode, postprocess, run_stage, save


class Prepared(Protocol):
    """What every task's inputs stage returns (tasks add their own fields)."""

    plan: SamplingPlan
    steps_per_batch: int
    infotext: InfotextFields
    warnings: tuple[str, ...]
    passthrough: tuple[Image.Image, ...] | None  # returned as they are, without sampling (an empty mask)


Pass = Callable[[Job, Any, Batch, Sampled | None], Sampled]


def keep_image(prepared: Any, image: Image.Image, index: int) -> Image.Image:
    return image


@dataclass(frozen=True)
class Task:
    """A task kind: its name (the hooks' task, the output folder), its inputs stage and its passes."""

    name: str
    inputs: Callable[[Job], Any]  # Job -> Prepared
    passes: tuple[Pass, ...]
    finish: Callable[[Any, Image.Image, int], Image.Image] = keep_image  # (prepared, image, index in batch)


def run_task(job: Job, task: Task) -> Result:
    """All batches of the job; the model patch (LoRA etc.) is on while they run."""
    result = Result()
    prepared = run_stage(job, INPUTS, task.inputs, job)
    result.warnings.extend(prepared.warnings)
    with job.hooks.patch(job.model, job.params).applied():
        for batch in batches(job):
            if job.control.stop == INTERRUPT:
                break
            _add(result, batch, _run_batch(job, task, prepared, batch, result))
            job.control.clear_skip()
    result.interrupted = job.control.stop == INTERRUPT
    result.warnings.extend(job.hooks.warnings)
    return result


def sample_passes(job: Job, task: Task, prepared: Any, batch: Batch) -> Sampled:
    """The task's passes in order; a stopped pass (interrupt, skip) ends the batch's sampling."""
    sampled: Sampled | None = None
    for run_pass in task.passes:
        if sampled is not None and sampled.stop is not None:
            break  # an interrupted or skipped first pass is not upscaled
        sampled = run_pass(job, prepared, batch, sampled)
    return sampled


def _run_batch(job: Job, task: Task, prepared: Any, batch: Batch, result: Result) -> Saved:
    if prepared.passthrough is not None:
        originals = prepared.passthrough
        decoded = Decoded(tuple(originals[i if len(originals) > 1 else 0].copy() for i in range(len(batch.seeds))))
    else:
        sampled = sample_passes(job, task, prepared, batch)
        result.warnings.extend(sampled.warnings)
        decoded = run_stage(job, DECODE, decode, job, sampled.latents)
        result.warnings.extend(decoded.warnings)
    images = run_stage(job, POSTPROCESS, postprocess, job, batch, decoded.images, len(result.images),
                       lambda image, i: task.finish(prepared, image, i))
    return run_stage(job, SAVE, save, job, batch, images, prepared.plan, prepared.infotext)


def _add(result: Result, batch: Batch, saved: Saved) -> None:
    for i, image in enumerate(saved.images):
        result.images.append(image)
        result.infotexts.append(saved.infotexts[i])
        result.seeds.append(batch.seeds[i])
        result.subseeds.append(batch.subseeds[i])
        result.prompts.append(batch.prompts[i])
        result.negative_prompts.append(batch.negatives[i])
    result.paths.extend(saved.paths)
