"""Job kind -> engine call. Job data maps to the typed params by field name, never by position."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.errors import InvalidParams
from modules.jobs.model import JobSpec

IMAGE_INPUT_FIELDS = ("init_images", "mask")  # stored as files beside the job, loaded here


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


def _with_images(data: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Replace stored input image paths with PIL images for the engine."""
    data = dict(data)
    for name in IMAGE_INPUT_FIELDS:
        value = inputs.get(name)
        if isinstance(value, list):
            data[name] = [_open_image(p) for p in value]
        elif isinstance(value, str):
            data[name] = _open_image(value)
    return data


def run(engine, spec: JobSpec, control, on_progress):
    """Run one job on `engine` (on the worker thread) and return the engine's Result."""
    from modules.jobs.executor import typed_params

    data = dict(spec.params.get("params") or {})
    if spec.kind == "txt2img":
        from modules.pipeline.params import Txt2ImgParams

        return engine.txt2img(typed_params(Txt2ImgParams, data), control, on_progress)
    if spec.kind == "img2img":
        if not hasattr(engine, "img2img"):
            raise InvalidParams("img2img is not available in this build yet.")
        from modules.pipeline import params as params_module

        cls = params_module.Img2ImgParams
        data = _with_images(data, spec.params.get("inputs") or {})
        return engine.img2img(typed_params(cls, data), control, on_progress)
    raise InvalidParams(f"Unknown job kind {spec.kind!r}")


def save_job_images(result, folder: Path) -> list[Path]:
    """Save a result's images (with infotext) under the job's own folder, atomically."""
    from modules import images as image_files

    return [image_files.save_image(image, folder, seed, text)
            for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=False)]
