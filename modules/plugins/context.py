"""Context objects that hooks receive instead of globals."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobContext:
    """What a job-time hook may use: settings, registries, the task name, and a warning sink."""

    settings: Any
    registries: Any
    task: str = "txt2img"
    warnings: list[str] = field(default_factory=list)
    infotext: dict[str, Any] = field(default_factory=dict)  # extra infotext fields ("Lora hashes", ...)
    state: dict[str, Any] = field(default_factory=dict)  # per-job scratch space, keyed by extension name

    def warn(self, message: str) -> None:
        """Attach a warning to the job's result (shown to the user, never fatal)."""
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass(frozen=True)
class PostprocessContext:
    """One image's post-processing: its seed and index, and this post-processor's option values."""

    job: JobContext
    index: int  # the image's position in the job, from 0
    seed: int
    subseed: int
    options: Mapping[str, Any] = field(default_factory=dict)
