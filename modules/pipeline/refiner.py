"""A1111 1.10's refiner: from a fraction of a pass's steps on, a second checkpoint denoises.

The sigmas stay the base pass's; only the denoiser changes. The refiner's prompts are encoded
with its own text encoders (its own conditioner), and its model wrapper follows its own
prediction type. With the hires fix on, the refiner runs in the hires pass only (A1111's
default `hires_fix_refiner_pass`, "second pass").

The switch is by sampling steps: step i (0-based) of an n-step pass runs on the refiner when
i / n >= switch_at, so switch at 0.8 over 10 steps gives steps 9 and 10 to the refiner. A1111
writes "Refiner switch by sampling steps: True" for that mode, and so do we.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modules.errors import InvalidParams
from modules.pipeline.conditioning import PromptConditioner
from modules.pipeline.hooks import Denoiser

HIRES_REFINER_PASS = "second pass"  # A1111's default for `hires_fix_refiner_pass`


@dataclass(frozen=True)
class Refiner:
    """A job's refiner: its loaded model, its conditioner, and when it takes over."""

    model: Any  # LoadedModel (the base model itself when the same checkpoint is named)
    conditioner: PromptConditioner
    switch_at: float

    @property
    def label(self) -> str:
        """A1111's `short_title`: 'name [shorthash]'."""
        info, short = self.model.info, self.model.model_hash
        return f"{info.stem} [{short[:10]}]" if short else info.stem


def latent_space(model: Any) -> tuple[int, float, float]:
    """(channels, scale, shift) of a loaded model's latents: two models can share a pass only when equal."""
    family = model.spec.family
    if family is not None:
        return (family.latent.channels, family.latent.scale, family.latent.shift)
    return (int(model.unet.config.out_channels), float(model.spec.vae_scale_factor), 0.0)


def check_compatible(base: Any, refiner: Any) -> None:
    """Refuse a refiner whose latents mean something else than the base model's (SD1 vs SDXL, FLUX)."""
    if latent_space(base) != latent_space(refiner):
        raise InvalidParams(f"refiner {refiner.info.stem!r} ({refiner.spec.arch}) cannot continue a "
                            f"{base.spec.arch} model's latents: their latent spaces differ. Choose a refiner of "
                            f"the same family as {base.info.stem!r}.", field="refiner_checkpoint")
    if base.spec.is_inpaint != refiner.spec.is_inpaint:
        raise InvalidParams(f"refiner {refiner.info.stem!r} and {base.info.stem!r} must both be inpainting "
                            "models or both not", field="refiner_checkpoint")


def switch_step(switch_at: float, steps: int) -> int:
    """The first step (0-based) of an n-step pass that the refiner runs; n when it never runs."""
    return next((i for i in range(steps) if i / steps >= switch_at), steps)


def runs_in(params: Any, pass_name: str) -> bool:
    """Whether the refiner takes part in this pass ("first" or "hires")."""
    if getattr(params, "enable_hr", False):
        return pass_name == "hires"  # HIRES_REFINER_PASS
    return pass_name == "first"


def infotext_fields(refiner: Refiner | None) -> dict[str, Any]:
    if refiner is None:
        return {}
    return {"Refiner": refiner.label, "Refiner switch at": refiner.switch_at,
            "Refiner switch by sampling steps": True}


class SwitchDenoiser:
    """Runs `base` until step `at` of the pass, then `refiner` (both guided denoisers of one pass).

    The sampler's callback sets the step on both, so prompt schedules stay in step; attributes
    that samplers read after a call (`last_uncond`, `guidance`) come from the denoiser in use.
    """

    def __init__(self, base: Denoiser, refiner: Denoiser, at: int) -> None:
        self.base = base
        self.refiner = refiner
        self.at = at
        self.step = 0

    @property
    def active(self) -> Denoiser:
        return self.refiner if self.step >= self.at else self.base

    def set_step(self, step: int) -> None:
        self.step = step
        self.base.set_step(step)
        self.refiner.set_step(step)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.active(x, sigma)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "refiner", "at", "step"):
            raise AttributeError(name)
        return getattr(self.active, name)
