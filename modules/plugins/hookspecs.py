"""Every hook Atelier calls. Built-in features implement these hooks too."""
from __future__ import annotations

import pluggy

from modules.plugins.specs import SamplerSpec, SchedulerSpec, UpscalerSpec

PROJECT = "atelier"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_samplers() -> list[SamplerSpec]:
    """Return sampler specs to add to the sampler registry."""


@hookspec
def register_schedulers() -> list[SchedulerSpec]:
    """Return noise-schedule specs to add to the schedule registry."""


@hookspec
def register_upscalers() -> list[UpscalerSpec]:
    """Return upscalers (latent modes or pixel-space functions) for the hires fix."""
