"""img2img "Batch" from folders (A1111's input / output / inpaint mask directories): which folders a
caller may use, and the per-image jobs, queued through the one submit service.

Rule: on a server reachable only from this machine, any folder the server can read is allowed (it is
the user's own machine; relative paths are under `<data>/batch`). On a shared server (--listen,
--server-name), every folder must lie inside the caller's own `<data>/batch/<user>/` (relative paths
are taken from there), after symlinks are resolved, so no user reads or writes another's files or the
server's.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from modules.errors import InvalidParams
from modules.jobs.model import Caller, Job
from modules.jobs.submit import Submission
from modules.server.context import ServerContext
from modules.server.user_options import user_folder_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class BatchDirs:
    input: Path
    output: Path
    mask: Path | None


def batch_root(ctx: ServerContext, caller: Caller) -> Path:
    """Where relative folders start: the caller's own folder on a shared server, else `<data>/batch`."""
    base = ctx.data_dir / "batch"
    return base / user_folder_name(caller.owner) if ctx.config.exposed else base


def _folder(ctx: ServerContext, caller: Caller, text: str, name: str, must_exist: bool) -> Path:
    root = batch_root(ctx, caller)
    path = Path(text.strip()).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if ctx.config.exposed and not path.is_relative_to(root.resolve()):
        raise InvalidParams(f"{name} {text!r} is outside your batch folder {root}: on a shared server "
                            "(--listen) batch folders must be inside it", field=name)
    if must_exist and not path.is_dir():
        raise InvalidParams(f"{name} {text!r} is not a folder (relative folders start at {root})", field=name)
    return path


def resolve_dirs(ctx: ServerContext, caller: Caller, input_dir: str, output_dir: str, mask_dir: str) -> BatchDirs:
    """The three folders as allowed paths; InvalidParams names the one refused."""
    if not (input_dir or "").strip():
        raise InvalidParams("Input directory: give the folder that holds the images", field="input_dir")
    source = _folder(ctx, caller, input_dir, "input_dir", True)
    mask = _folder(ctx, caller, mask_dir, "inpaint_mask_dir", True) if (mask_dir or "").strip() else None
    if (output_dir or "").strip():
        output = _folder(ctx, caller, output_dir, "output_dir", False)
    else:
        output = ctx.app.settings.outputs_dir / "img2img-images" if not ctx.config.exposed \
            else batch_root(ctx, caller) / "output"
    if output == source:
        raise InvalidParams("Output directory must differ from the input directory", field="output_dir")
    return BatchDirs(source, output, mask)


def batch_images(dirs: BatchDirs) -> list[tuple[Path, Path | None]]:
    """(image, its mask or None) for each image in the input folder, by name; masks match by file stem."""
    images = sorted(p for p in dirs.input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InvalidParams(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {dirs.input}", field="input_dir")
    masks = {}
    if dirs.mask is not None:
        masks = {p.stem: p for p in sorted(dirs.mask.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    return [(p, masks.get(p.stem)) for p in images]


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise InvalidParams(f"{path.name} is not a readable image ({err})", field="input_dir") from None


def submit_batch(ctx: ServerContext, caller: Caller, values: Mapping[str, Any], dirs: BatchDirs,
                 checkpoint: str | None) -> list[tuple[Path, Job]]:
    """One img2img (or, with a mask, inpaint) job per image, for `caller`; all are checked before any is queued."""
    submissions = []
    for image_path, mask_path in batch_images(dirs):
        images = {"init_images": [_open(image_path, "RGB")], "mask": _open(mask_path, "L") if mask_path else None}
        submission = Submission("img2img", {**values, "save_images": True}, images, checkpoint=checkpoint,
                                source="ui")
        ctx.submitter.prepare(submission, caller)  # validates; nothing is queued on a bad one
        submissions.append((image_path, submission))
    return [(path, ctx.submitter.submit(caller, sub)) for path, sub in submissions]


def copy_outputs(job: Job, source: Path, output: Path) -> list[Path]:
    """The job's images into `output`, named after the input image (A1111's batch naming)."""
    if job.result is None:
        return []
    output.mkdir(parents=True, exist_ok=True)
    copied = []
    for i, image in enumerate(job.result.images):
        suffix = Path(image).suffix
        target = output / (f"{source.stem}{suffix}" if i == 0 else f"{source.stem}-{i}{suffix}")
        shutil.copyfile(image, target)
        copied.append(target)
    return copied
