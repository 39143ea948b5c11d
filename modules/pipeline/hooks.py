"""What the pipeline needs from extensions, defined here so the pipeline never imports plugins.

`StageHooks` is the protocol one job's hooks object implements
(`modules.plugins.jobhooks.JobHooks` does, over pluggy); `NoHooks` is the no-op default.
Three kinds of seam:

- job-time hooks the run loop calls: `prepare`, `patch`, `embeddings`, `on_guided`,
  `postprocess`, `infotext`, `saved`, `warnings`;
- denoiser wrap points: `wrap_model` wraps the model call of every UNet row
  (`(x, sigma, cross_attn, pooled=None, concat=None) -> denoised`), `wrap_denoiser` wraps
  the guided denoiser a sampler calls (`(x, sigma) -> denoised` with `set_step`);
  `unet_residuals` returns the pass's conditioning function (`UNetCall -> UNetResiduals`:
  where ControlNet adds its per-step residuals inside the UNet), `unet_cross_attention` the
  pass's cross-attention patch (IP-Adapter), `unet_hidden_states` its self-attention and block
  taps with reference inputs (reference-only); all get a `DenoiserContext`;
- stage hooks: `before_stage(name, job)` and `after_stage(name, job, value) -> value` around
  each stage (`STAGES`), which may replace the stage's output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from modules.sampling.attention import CrossAttentionFn
from modules.sampling.denoisers import GuidanceHook, ResidualFn
from modules.sampling.hidden_states import HiddenStatesPatch

INPUTS, CONDITIONING, SAMPLING, UPSCALE = "inputs", "conditioning", "sampling", "upscale"
DECODE, POSTPROCESS, SAVE = "decode", "postprocess", "save"
STAGES = (INPUTS, CONDITIONING, SAMPLING, UPSCALE, DECODE, POSTPROCESS, SAVE)  # UPSCALE: hires pass only

ModelFn = Callable[..., torch.Tensor]  # (x, sigma, cross_attn, pooled=None, concat=None) -> denoised


class Denoiser(Protocol):
    """The guided k-diffusion model a sampler calls."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def set_step(self, step: int) -> None: ...


@dataclass
class StepClock:
    """Sampling steps completed in the current pass; the sampling stage advances it."""

    step: int = 0


@dataclass(frozen=True)
class DenoiserContext:
    """What a denoiser wrapper may read: the pass, its size and conditioning, and the current step."""

    task: str  # "txt2img" or "img2img"
    pass_name: str  # "first" or "hires"
    params: Any
    width: int
    height: int
    conds: Sequence[Any]  # per image: [(ScheduledCond, weight), ...] (one per AND part)
    unconds: Sequence[Any]  # per image: the negative prompt's ScheduledCond
    cfg_scale: float
    sigmas: torch.Tensor
    clock: StepClock = field(default_factory=StepClock)
    arch: str = ""  # the loaded model's architecture ("sd1", "sd2", "sdxl", ...)
    init_images: Sequence[Any] = ()  # img2img: the pass's init images (PIL), as the task prepared them
    mask: Any = None  # img2img: the working mask (PIL "L"), when inpainting
    # pixels [B, 3, H, W] in [-1, 1] -> the model's scaled latents (the VAE's mode) on its device (API 1.9)
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def step(self) -> int:
        """Sampling steps completed before the current model call."""
        return self.clock.step


class DenoiserWrapper:
    """Base for `wrap_denoiser` results: forwards `set_step` and other attributes (`guidance`, ...)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner

    def set_step(self, step: int) -> None:
        self.inner.set_step(step)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.inner(x, sigma)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Patch(Protocol):
    def applied(self) -> Any: ...  # a context manager: the patch is on inside it


@runtime_checkable
class StageHooks(Protocol):
    """One job's hooks, as the pipeline calls them (see the module docstring)."""

    on_guided: GuidanceHook | None

    def prepare(self, params: Any) -> Any: ...

    def patch(self, model: Any, params: Any) -> Patch: ...

    def embeddings(self, model: Any, tokenizer: Any, params: Any) -> Any: ...

    def postprocess(self, image: Any, params: Any, index: int, seed: int, subseed: int) -> Any: ...

    def infotext(self) -> Mapping[str, Any]: ...

    def saved(self, path: Any, params: Any, infotext: str) -> None: ...

    @property
    def warnings(self) -> list[str]: ...

    def wrap_model(self, model: ModelFn, context: DenoiserContext) -> ModelFn: ...

    def wrap_denoiser(self, denoiser: Denoiser, context: DenoiserContext) -> Denoiser: ...

    def unet_residuals(self, context: DenoiserContext) -> ResidualFn | None: ...

    def unet_cross_attention(self, context: DenoiserContext) -> CrossAttentionFn | None: ...

    def unet_hidden_states(self, context: DenoiserContext) -> HiddenStatesPatch | None: ...

    def before_stage(self, name: str, job: Any) -> None: ...

    def after_stage(self, name: str, job: Any, value: Any) -> Any: ...


class NoPatch:
    """A model patch that changes nothing."""

    @contextmanager
    def applied(self) -> Iterator[None]:
        yield


class PassThroughStages:
    """The denoiser and stage points of `StageHooks`, changing nothing (for hooks that add none yet)."""

    def wrap_model(self, model: ModelFn, context: DenoiserContext) -> ModelFn:
        return model

    def wrap_denoiser(self, denoiser: Denoiser, context: DenoiserContext) -> Denoiser:
        return denoiser

    def unet_residuals(self, context: DenoiserContext) -> ResidualFn | None:
        return None

    def unet_cross_attention(self, context: DenoiserContext) -> CrossAttentionFn | None:
        return None

    def unet_hidden_states(self, context: DenoiserContext) -> HiddenStatesPatch | None:
        return None

    def before_stage(self, name: str, job: Any) -> None:
        return None

    def after_stage(self, name: str, job: Any, value: Any) -> Any:
        return value


class NoHooks(PassThroughStages):
    """The default hooks: every seam is a no-op (library use without extensions, tests)."""

    on_guided: GuidanceHook | None = None

    def __init__(self) -> None:
        self._warnings: list[str] = []

    def prepare(self, params: Any) -> Any:
        return params

    def patch(self, model: Any, params: Any) -> Patch:
        return NoPatch()

    def embeddings(self, model: Any, tokenizer: Any, params: Any) -> Any:
        return None

    def postprocess(self, image: Any, params: Any, index: int, seed: int, subseed: int) -> Any:
        return image

    def infotext(self) -> Mapping[str, Any]:
        return {}

    def saved(self, path: Any, params: Any, infotext: str) -> None:
        return None

    @property
    def warnings(self) -> list[str]:
        return self._warnings
