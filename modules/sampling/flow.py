"""Flow matching (rectified flow: SD3.5, FLUX.1) under the same sampler functions.

A flow model predicts the velocity v = noise - x0 of x_t = (1 - t) x0 + t noise. With sigma = t
the k-diffusion ODE derivative (x - x0) / sigma is exactly v, so `x0 = x - sigma * v` lets every
sampler run unchanged. The model's timestep is sigma (FLUX) or 1000 * sigma (SD3).

Time shift (SD3's `shift`, Esser et al. 2024): sigma(t) = s t / (1 + (s - 1) t). FLUX.1-dev's
shift depends on the image's token count n as diffusers computes it: mu grows linearly from
`base` at 256 tokens to `max` at 4096, and s = exp(mu).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

FLOW_TIMESTEPS = 1000


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(image_tokens: int, base: float = 0.5, top: float = 1.15,
                     base_tokens: int = 256, max_tokens: int = 4096) -> float:
    """FLUX.1-dev's shift for `image_tokens` 2x2 latent patches: exp(mu), mu linear in the token count."""
    slope = (top - base) / (max_tokens - base_tokens)
    mu = image_tokens * slope + (base - slope * base_tokens)
    return math.exp(mu)


def job_shift(family, width: int, height: int, explicit: float | None) -> float:
    """The shift a job samples with: an explicit one, else the family's (resolution-dependent for FLUX.1-dev)."""
    if explicit:
        return float(explicit)
    if family.dynamic_shift is not None:
        base, top = family.dynamic_shift
        return resolution_shift((height // 16) * (width // 16), base, top)
    return family.shift


def flow_sigma_table(shift: float, timesteps: int = FLOW_TIMESTEPS) -> torch.Tensor:
    """The model's ascending discrete sigmas: shifted t = 1/T .. 1 (as ComfyUI's flow model sampling)."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return shift_sigma(t, shift)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's [B, H/2 * W/2, 4C] sequence of 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    c = c4 // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(row, column) position ids of each 2x2 patch, axis 0 left at zero."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowDenoiser:
    """Velocity prediction: denoised = x - sigma * v, no input scaling (the `ModelDenoiser` interface).

    `guidance` is FLUX.1-dev's distilled guidance (its guidance embedding); ignored by models without one.
    `sigma_to_t` and `time_ids` are accepted for the common constructor and unused: the timestep is sigma.
    """

    prediction = "flow"

    def __init__(self, unet: torch.nn.Module, sigma_to_t: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 time_ids: torch.Tensor | None = None, guidance: float | None = None) -> None:
        self.unet = unet
        self.dtype = next(unet.parameters()).dtype
        self.flux = hasattr(unet.config, "guidance_embeds")
        self.guidance = guidance if getattr(unet.config, "guidance_embeds", False) else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor,
                 pooled: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
        v = self.velocity(x, sigma.reshape(-1), cross_attn, pooled, uncond)
        return x - v * sigma.reshape(-1, 1, 1, 1).to(x.dtype)

    def extra_inputs(self, x: torch.Tensor, sigma: torch.Tensor, inputs: dict[str, Any],
                     uncond: torch.Tensor | None) -> dict[str, Any]:
        """More keyword arguments for the FLUX transformer call (subclasses: conditioning hooks); none here."""
        return {}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor,
                 pooled: torch.Tensor | None, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """The model's raw velocity for latents `x` [B, C, H, W] at `sigma` [B]."""
        dt = self.dtype
        ctx = cross_attn.to(x.device, dt)
        vec = pooled.to(x.device, dt)
        if not self.flux:
            out = self.unet(hidden_states=x.to(dt), encoder_hidden_states=ctx, pooled_projections=vec,
                            timestep=(sigma * FLOW_TIMESTEPS).to(x.device, dt), return_dict=False)[0]
            return out.float()
        h, w = x.shape[-2:]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), float(self.guidance), device=x.device, dtype=dt)
        inputs: dict[str, Any] = dict(
            hidden_states=pack_latents(x).to(dt), encoder_hidden_states=ctx, pooled_projections=vec,
            timestep=sigma.to(x.device, dt), img_ids=flux_image_ids(h, w, x.device, dt),
            txt_ids=torch.zeros(ctx.shape[1], 3, device=x.device, dtype=dt), guidance=guidance)
        inputs.update(self.extra_inputs(x, sigma, inputs, uncond))
        out = self.unet(**inputs, return_dict=False)[0]
        return unpack_latents(out.float(), h, w)
