"""Scripts inside the job system: their arguments are checked at submit time, and they run on the worker.

Why a script runs inside its job (and not as sub-jobs queued one by one): the whole X/Y/Z plot
is one job of one user. It is queued fairly against other users' jobs, its cells cannot be
interleaved with someone else's (so a checkpoint axis switches models once per value, not once
per cell), interrupt and cancel reach every cell through the job's one control, and progress
reads "cell 3/12". Each cell calls the engine exactly as a plain job does.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams
from modules.interrogate.options import InterrogateOptions
from modules.plugins.grids import GridOptions, grid_options
from modules.plugins.scripts import ScriptCheck, ScriptContext, find_script, script_args

log = logging.getLogger(__name__)


def check_script(submission: Any, params: Any, registries: Any, find_checkpoint: Callable[[str], str],
                 limits: Any = None, options: Mapping[str, Any] | None = None,
                 interrogation: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The submission's script as the payload stores it ({"name", "args" by name, "grid" options}), checked;
    None: no script. `options` are the caller's A1111 options (grid_format, n_rows, ...).

    Raises InvalidParams naming the bad value (an unknown sampler on an axis, ...) before anything is queued.
    """
    script = submission.script
    if not script or not script.get("name") or str(script.get("name")).lower() == "none":
        return None
    spec = find_script(registries.scripts, str(script["name"]), submission.kind)
    args = script_args(spec, script.get("args"))
    if spec.check is not None:
        try:
            spec.check(ScriptCheck(submission.kind, params, args, registries, find_checkpoint, limits,
                                   interrogation))
        except InvalidParams as err:
            err.field = err.field or "script_args"
            raise
        except Exception as err:  # a broken script's check refuses the job; it never becomes a server error
            log.warning("script %r failed to check its arguments", spec.name, exc_info=True)
            raise InvalidParams(f"{spec.name}: cannot use these arguments ({type(err).__name__}: {err})",
                                field="script_args") from None
    try:
        grid = grid_options(options or {})
    except ValueError as err:
        raise InvalidParams(f"the grid options are not valid: {err}", field="script_name") from None
    names = InterrogateOptions.__dataclass_fields__  # the caller's, for ctx.interrogate (checked when used)
    interrogate = {k: v for k, v in (options or {}).items() if k in names}
    return {"name": spec.name, "args": args, "grid": grid.to_json(), "interrogate": interrogate}


def _interrogation(engine: Any, options: Mapping[str, Any] | None) -> Callable[[Any, str], str]:
    """`ctx.interrogate(image, model)` on the job's engine with the options the job was submitted with."""
    def interrogate(image: Any, model: str) -> str:
        chosen = InterrogateOptions.from_options(options)
        return engine.interrogator.interrogate(image.convert("RGB"), model, chosen)

    return interrogate


def run_script(engine: Any, task: str, script: Mapping[str, Any], params: Any, checkpoint: str, control: Any,
               on_progress: Callable[[Any], None] | None, load_model: Callable[[str], str] | None) -> Any:
    """Run the payload's script on the worker and return its Result."""
    spec = engine.registries.scripts.get(script["name"])
    ctx: ScriptContext | None = None

    def process(cell_params: Any, cell_checkpoint: str | None, text: str) -> Any:
        if load_model is not None:
            load_model(cell_checkpoint or checkpoint)
        control.clear_skip()

        def progress(p: Any) -> None:
            if on_progress is not None:
                on_progress(dataclasses.replace(p, job_no=ctx.done - 1, job_count=ctx.total, text=text))

        return engine.generate(cell_params, control, progress)

    grid = grid_options(script.get("grid") or {})

    def saver(folder: Path, options: GridOptions | None = None) -> Callable[[Any, int, str], Path | None]:
        def save(image: Any, seed: int, infotext: str) -> Path | None:
            if not params.save_images or (options is not None and not options.save):
                return None
            from modules import images as image_files

            if options is None:
                return image_files.save_image(image, folder, seed, infotext)
            return image_files.save_image(image, folder, seed, infotext if options.infotext else None,
                                          fmt=options.format)

        return save

    def find_checkpoint(name: str) -> str:
        return engine.find_checkpoint(name).name

    ctx = ScriptContext(task, params, dict(script.get("args") or {}), engine.registries, checkpoint,
                        find_checkpoint, process, saver(engine.settings.outputs_dir / f"{task}-grids", grid),
                        lambda: control.interrupted,
                        saver(params.outdir or engine.settings.outputs_dir / f"{task}-images"), grid=grid,
                        interrogate_fn=_interrogation(engine, script.get("interrogate")))
    result = spec.run(ctx)
    for warning in ctx.warnings:
        if warning not in result.warnings:
            result.warnings.append(warning)
    if len(result.paths) != len(result.images):  # some not saved: the executor keeps them all in the job folder
        result.paths = []
    return result
