"""Interrupt, skip and progress reporting between sampling steps."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modules.sampling.denoisers import StopSampling

__all__ = ["INTERRUPT", "SKIP", "JobControl", "Progress", "ProgressCallback", "StopSampling"]

INTERRUPT, SKIP = "interrupt", "skip"  # the stop values sampling returns


class JobControl:
    """Flags a front end sets and the engine polls between steps. One per job."""

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()

    @property
    def stop(self) -> str | None:
        """The flags as a value: "interrupt", "skip", or None to go on."""
        if self.interrupted:
            return INTERRUPT
        return SKIP if self.skipped else None

    def check(self) -> None:
        """Raise StopSampling (inside the denoiser) when the job should stop sampling."""
        stop = self.stop
        if stop is not None:
            raise StopSampling(stop)


@dataclass(frozen=True)
class Progress:
    """One step of one batch. `preview` is a cheap PIL image, or None between previews."""

    job_no: int  # batch index within n_iter, from 0
    job_count: int
    step: int  # steps done in this batch
    steps: int
    preview: Any = None
    text: str = ""  # set by a script run: "cell 3/12"

    @property
    def fraction(self) -> float:
        return (self.job_no + self.step / max(self.steps, 1)) / max(self.job_count, 1)


ProgressCallback = Callable[[Progress], None]
