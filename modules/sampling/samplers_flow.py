"""Noise-adding samplers on rectified-flow models (FLUX.1, SD3.5): x = (1 - sigma) x0 + sigma noise.

A flow state is a variance-exploding (VE) one scaled by alpha = 1 - sigma: x / alpha = x0 + (sigma / alpha) noise.
So a sampler written for VE models (k-diffusion's form: Restart's, ER-SDE's, SA-Solver's, DDIM's eta, LCM's
and TCD's renoising, churn) runs exactly on a flow model when it sees `x_ve = x / alpha` at
`sigma_ve = sigma / alpha` and the denoiser is called back in flow terms (`in_ve_form`). The ODE part is the
same either way (Euler's step is DDIM's in both), only the added noise changes. ComfyUI does the same for its
CONST models (ER-SDE's `sigma / alpha` lambdas, LCM's `noise_scaling`).

Restart gets a native flow form instead (`sample_restart`): its plan is built in flow sigmas, where
A1111's Karras rebuild from sigma_max would spend most steps near pure noise.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from modules.sampling import samplers_extra as extra
from modules.sampling.samplers import (
    default_noise_sampler,
    flow_safe_sigmas,
    sigma_list,
)

A1111_RESTART = (0.1, 2.0)  # A1111's automatic restart: from VE sigma 0.1 back up to VE sigma 2


def ve_sigma(sigma):
    """sigma / (1 - sigma): a flow sigma as a VE one (float or tensor)."""
    return sigma / (1 - sigma)


def flow_sigma(sigma_ve):
    """sigma_ve / (1 + sigma_ve): the inverse of `ve_sigma`."""
    return sigma_ve / (1 + sigma_ve)


class VEModel:
    """A flow denoiser seen as a VE one: D_ve(x_ve, s_ve) = D(x_ve / (1 + s_ve), s_ve / (1 + s_ve)).
    Other attributes (CFG++'s `last_uncond`: denoised estimates are the same in both forms) are forwarded."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model = model

    def __call__(self, x_ve: torch.Tensor, sigma_ve: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        scale = (1 + sigma_ve).reshape(-1, *([1] * (x_ve.ndim - 1))).to(x_ve.dtype)
        return self.model(x_ve / scale, flow_sigma(sigma_ve), **extra_args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def in_ve_form(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The VE sampler `function` run on a flow model: sigmas, state, model, callback, noise sampler and the
    model's sigma table (`model_sigmas`) are converted; the result is back in flow form."""

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
        sig = flow_safe_sigmas(sigma_list(sigmas), True)  # sigma 1 is infinite in VE form
        sigmas_ve = torch.tensor([ve_sigma(s) for s in sig], dtype=torch.float64).to(sigmas.device, sigmas.dtype)
        if options.get("model_sigmas") is not None:
            table = torch.as_tensor(options["model_sigmas"], dtype=torch.float64).clamp(max=1 - 1e-4)
            options["model_sigmas"] = ve_sigma(table)
        for key in ("s_tmin", "s_tmax"):  # churn's window, given in the model's sigmas
            if key in options and options[key] < 1:
                options[key] = ve_sigma(options[key])
        noise_sampler = noise_sampler or default_noise_sampler(x)

        def noise_ve(s_ve, s_next_ve):  # Brownian trees span the flow sigmas
            return noise_sampler(flow_sigma(s_ve), flow_sigma(s_next_ve))

        def callback_ve(info: dict) -> None:  # x is at sigma_hat (above sigma after churn)
            sigma_hat = float(info["sigma_hat"])
            callback({**info, "x": info["x"] / (1 + sigma_hat), "sigma": flow_sigma(float(info["sigma"])),
                      "sigma_hat": flow_sigma(sigma_hat)})

        x_ve = function(VEModel(model), x / (1 - sig[0]), sigmas_ve, extra_args=extra_args,
                        callback=callback_ve if callback else None, disable=disable, noise_sampler=noise_ve,
                        **options)
        return x_ve / (1 + float(sigmas_ve[-1]))

    sample.__name__ = f"{getattr(function, '__name__', 'sampler')}_flow"
    sample.__doc__ = function.__doc__
    return sample


def adds_noise(uses_noise: bool, options: dict[str, Any]) -> bool:
    """Whether a sampler run adds noise: an ancestral / SDE sampler with eta above 0 (or none to set),
    DDIM's eta, or churn."""
    if options.get("s_churn", 0) > 0:
        return True
    return options.get("eta", 1.0 if uses_noise else 0.0) > 0


# ---- Restart ------------------------------------------------------------------------------------------------


def resample(sig: list[float], steps: int) -> list[float]:
    """The schedule `sig` (ending in 0) with `steps` steps instead, its shape kept (linear in the step index)."""
    positive = sig[:-1]
    at = np.linspace(0, len(positive) - 1, steps)
    return [*np.interp(at, np.arange(len(positive)), positive).tolist(), 0.0]


def flow_restart_plan(sig: list[float], restart_list: dict | None) -> list[tuple[float, float]]:
    """A1111's automatic Restart (from 20 steps: `steps - k n` steps plus n restarts of k steps; k = 9, n = 1,
    from 36 steps k = steps // 4, n = 2) on the job's own flow schedule, its sigma levels 0.1 and 2 taken as VE
    sigmas. An explicit `restart_list` is in the flow model's sigmas."""
    steps = len(sig) - 1
    if restart_list is None and steps >= 20:
        k, n = (steps // 4, 2) if steps >= 36 else (9, 1)
        sig = resample(sig, steps - k * n)
        low, top = (flow_sigma(s) for s in A1111_RESTART)
        restart_list = {low: [k + 1, n, top]}
    return extra.restart_steps(sig, restart_list or {})


def renoise(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """x at flow level sigma_from taken up to sigma_to: x0's weight becomes 1 - sigma_to, the noise variance
    sigma_to^2."""
    ratio = (1 - sigma_to) / (1 - sigma_from)
    return ratio * x + noise * math.sqrt(max(sigma_to**2 - (ratio * sigma_from) ** 2, 0.0))


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                   s_noise: float = 1.0, restart_list: dict | None = None, flow: bool = False) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023) as in A1111; on flow models (`flow`) the plan is built on the job's
    flow schedule and each restart renoises in the flow form."""
    if not flow:
        return extra.sample_restart(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                                    s_noise=s_noise, restart_list=restart_list)
    noise_sampler = noise_sampler or default_noise_sampler(x)

    def flow_renoise(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return renoise(x, low, high, noise_sampler(low, high) * s_noise)

    plan = flow_restart_plan(sigma_list(sigmas), restart_list)
    return extra.heun_restart_steps(model, x, plan, flow_renoise, extra_args, callback)
