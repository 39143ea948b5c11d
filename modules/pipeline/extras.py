"""Extras as a job: the typed params the job system queues, and the run on the executor's worker.

`ExtrasJobParams` holds A1111's Extras fields plus the input images (stored beside the job, as
img2img's are). The run restores faces (GFPGAN, then CodeFormer, by visibility) and upscales image by
image with the engine's registries (before the faces when `upscale_first`), reports progress per
tile, and stops between tiles when the job is interrupted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams, JobInterrupted
from modules.pipeline.control import JobControl, Progress, ProgressCallback
from modules.pipeline.params import Result
from modules.settings import Limits
from modules.upscalers import extras

OUTPUT_SIDE_FACTOR = 4  # an Extras result may be up to 4x --max-size a side (16384 by default)


@dataclass(frozen=True)
class ExtrasJobParams(extras.ExtrasParams):
    init_images: tuple = ()
    mask: Any = None  # unused; the job system clears image fields by these names
    outdir: Path | None = None

    needs_checkpoint = False  # class attribute: the executor loads no checkpoint for Extras
    n_iter = 1  # A1111's progress counts batches; Extras is one

    def validate(self, limits: Limits) -> None:  # type: ignore[override]
        super().validate(limits.max_size)
        limit = limits.max_size * OUTPUT_SIDE_FACTOR
        for image in self.init_images:
            upscaling = self.upscaler_1 not in ("", "None")
            scale = extras.target_scale(self, image.size) if upscaling else 1
            if max(image.size) * scale > limit:
                raise InvalidParams(f"the result would be {round(image.width * scale)}x"
                                    f"{round(image.height * scale)}; the limit is {limit} a side (4x --max-size)",
                                    field="upscaling_resize")

    def upscale_params(self) -> extras.ExtrasParams:
        names = {f.name for f in dataclasses.fields(extras.ExtrasParams)}
        return extras.ExtrasParams(**{name: getattr(self, name) for name in names})


def upscaler_lookup(registries: Any, on_tile: Any = None) -> Any:
    """Pixel upscalers by name for Extras; model upscalers report `on_tile(done, total)`."""
    def lookup(name: str) -> extras.UpscaleFn:
        spec = registries.upscalers.get(name)
        if spec.is_latent:
            raise InvalidParams(f"{name!r} is a latent upscaler (hires fix only); Extras needs a pixel upscaler")
        if spec.model_path and on_tile is not None:
            return lambda image, scale: spec.function(image, scale, progress=on_tile)
        return spec.function

    return lookup


def restore_faces(registries: Any, params: extras.ExtrasParams, image: Any) -> tuple[Any, dict[str, Any]]:
    """GFPGAN then CodeFormer at their visibilities (A1111's Extras order) and their infotext fields."""
    info: dict[str, Any] = {}
    if params.gfpgan_visibility <= 0 and params.codeformer_visibility <= 0:
        return image, info
    faces = getattr(registries, "face_restorers", None)
    if faces is None:
        raise InvalidParams("Face restoration is not available in this process", field="gfpgan_visibility")
    if params.gfpgan_visibility > 0:
        image = faces.restore(image, "GFPGAN", visibility=params.gfpgan_visibility)
        info["GFPGAN visibility"] = params.gfpgan_visibility
    if params.codeformer_visibility > 0:
        image = faces.restore(image, "CodeFormer", weight=params.codeformer_weight,
                              visibility=params.codeformer_visibility)
        info.update({"CodeFormer visibility": params.codeformer_visibility,
                     "CodeFormer weight": params.codeformer_weight})
    return image, info


def _process(registries: Any, params: extras.ExtrasParams, image: Any, on_tile: Any) -> tuple[Any, dict[str, Any]]:
    image = image.convert("RGB")
    if params.upscale_first:
        image, info = extras.upscale(image, params, upscaler_lookup(registries, on_tile))
        image, faces = restore_faces(registries, params, image)
        return image, {**info, **faces}
    image, faces = restore_faces(registries, params, image)
    image, info = extras.upscale(image, params, upscaler_lookup(registries, on_tile))
    return image, {**faces, **info}


def run_extras(registries: Any, params: ExtrasJobParams, control: JobControl | None = None,
               on_progress: ProgressCallback | None = None) -> Result:
    """Upscale every input image; an interrupt between tiles ends the job with the images done so far."""
    control = control or JobControl()
    count = len(params.init_images)
    result = Result()

    def tile_done(index: int):
        def on_tile(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(Progress(index, count, done, total))
            if control.interrupted:
                raise JobInterrupted("Extras interrupted")

        return on_tile

    upscale = params.upscale_params()
    for index, image in enumerate(params.init_images):
        if control.interrupted:
            result.interrupted = True
            break
        try:
            image, info = _process(registries, upscale, image, tile_done(index))
        except JobInterrupted:
            result.interrupted = True
            break
        result.images.append(image)
        result.infotexts.append(", ".join(f"{k}: {v}" for k, v in info.items()))
        result.seeds.append(0)
        result.subseeds.append(0)
        result.prompts.append("")
        result.negative_prompts.append("")
    return result
