"""Run a job with hooks that record each stage's name and output (for tests that look inside a job)."""
from __future__ import annotations

from typing import Any


class RecordingHooks:
    """Delegates to a job's real hooks and records the stages: `stages` in order, `values[name]` outputs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stages: list[str] = []
        self.values: dict[str, list[Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def before_stage(self, name: str, job: Any) -> None:
        self.stages.append(name)
        self.inner.before_stage(name, job)

    def after_stage(self, name: str, job: Any, value: Any) -> Any:
        value = self.inner.after_stage(name, job, value)
        self.values.setdefault(name, []).append(value)
        return value


def run_recorded(engine, params, control=None, on_progress=None):
    """(result, hooks): the job validated and run as `engine.txt2img` / `img2img` would, stages recorded."""
    params.validate(engine.settings.limits)
    hooks = RecordingHooks(engine.job_hooks("txt2img" if type(params).__name__ == "Txt2ImgParams" else "img2img"))
    result = engine.run(engine.new_job(params, control, on_progress, hooks=hooks))
    return result, hooks
