"""A job queue for one process without a server (the CLI): the same submit service, executor and events."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modules.errors import CheckpointError
from modules.jobs.executor import LocalExecutor
from modules.jobs.manager import JobEvent, JobManager
from modules.jobs.overrides import options_from_settings
from modules.jobs.store import JobStore
from modules.jobs.submit import SubmitService


def _default_checkpoint(engine) -> Callable[[str | None], tuple[str, str]]:
    def resolve(name: str | None) -> tuple[str, str]:
        info = engine.find_checkpoint(name) if name else engine.default_checkpoint()
        if info is None:
            raise CheckpointError("generate needs --ckpt FILE (a .safetensors/.ckpt file or a diffusers folder)")
        return str(info.path), info.name

    return resolve


@contextlib.contextmanager
def local_jobs(app: Any, outdir: Path | None = None,
               on_event: Callable[[JobEvent], None] | None = None) -> Iterator[tuple[JobManager, SubmitService]]:
    """A running job manager (history in memory) and its submit service; closed on exit."""
    settings = app.settings
    jobs = JobManager(JobStore(":memory:"), LocalExecutor(app.engine, settings.data_dir / "job-images", outdir))
    if on_event is not None:
        jobs.add_listener(on_event)
    options = options_from_settings(settings)
    submitter = SubmitService(jobs, settings.limits, app.registries, lambda _caller: options,
                              _default_checkpoint(app.engine), settings.data_dir / "job-inputs")
    jobs.start()
    try:
        yield jobs, submitter
    finally:
        jobs.close()
