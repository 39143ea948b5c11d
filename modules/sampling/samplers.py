"""k-diffusion-style samplers: Euler family, Heun, DPM2, LMS, DDIM and LCM.

Every sampler is a pure function
`sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options)`:

- `model(x, sigma_batch, **extra_args)` returns the denoised prediction (Karras et al.'s D(x; sigma));
- `sigmas` are the descending noise levels ending in 0 and `x` starts at noise level `sigmas[0]`;
- `callback({"x", "i", "sigma", "sigma_hat", "denoised"})` is called once per step, with
  `sigma`/`sigma_hat` as Python floats;
- `noise_sampler(sigma, sigma_next)` returns fresh unit noise shaped like x (default
  `torch.randn_like`); the pipeline should always pass one built from each image's generator.

`disable` is accepted for k-diffusion compatibility (it toggles tqdm there); progress is
reported through `callback` only. DPM-Solver++ samplers live in `samplers_dpmpp`, UniPC
in `samplers_unipc`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from modules.errors import InvalidParams

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


# ---- shared helpers --------------------------------------------------------


def sigma_list(sigmas: torch.Tensor) -> list[float]:
    """Sigmas as Python floats (one device sync), validated: strictly descending, >= 0, at least 2."""
    values = [float(s) for s in torch.as_tensor(sigmas).detach().flatten().tolist()]
    if len(values) < 2:
        raise InvalidParams("A sampler needs at least two sigmas.")
    if any(not math.isfinite(s) or s < 0 for s in values) or any(b >= a for a, b in pairwise(values)):
        raise InvalidParams("Sigmas must be finite, non-negative and strictly decreasing.")
    return values


def default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    """Unseeded fallback: fresh `torch.randn_like(x)` noise on each call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def denoise(model: Model, x: torch.Tensor, sigma: float, extra_args: dict | None) -> torch.Tensor:
    """Call the model at one noise level, broadcast over the batch."""
    return model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic move to sigma_down plus fresh noise sigma_up.

    sigma_up^2 + sigma_down^2 = sigma_to^2; eta = 0 is deterministic, 1 is DDPM-like.
    """
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0)), sigma_up


def get_ancestral_step_rf(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float, float]:
    """The ancestral split for rectified flow, x = (1 - sigma) x0 + sigma noise (ComfyUI's form for CONST models).

    The deterministic move goes to sigma_down = sigma_to (1 + (sigma_to / sigma_from - 1) eta); then
    x <- (alpha_to / alpha_down) x + sigma_up noise with alpha = 1 - sigma and
    sigma_up^2 = sigma_to^2 - (sigma_down alpha_to / alpha_down)^2, so x0's weight is alpha_to and the noise's
    variance sigma_to^2 again. Returns (sigma_down, sigma_up, alpha_to / alpha_down).
    """
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    if not eta or sigma_to == 0:
        return sigma_to, 0.0, 1.0
    sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
    scale = (1 - sigma_to) / (1 - sigma_down)
    return sigma_down, math.sqrt(max(sigma_to**2 - (sigma_down * scale) ** 2, 0.0)), scale


def ancestral_step(sigma_from: float, sigma_to: float, eta: float, flow: bool) -> tuple[float, float, float]:
    """(sigma_down, sigma_up, scale of x before the noise): rectified-flow or k-diffusion's (scale 1) split."""
    if flow:
        return get_ancestral_step_rf(sigma_from, sigma_to, eta)
    return (*get_ancestral_step(sigma_from, sigma_to, eta), 1.0)


def half_log_snr(sigma: float, flow: bool) -> float:
    """lambda = log(alpha / sigma): alpha = 1 (k-diffusion's VE form) or 1 - sigma (rectified flow)."""
    return math.log((1 - sigma if flow else 1.0) / sigma)


def sigma_of(lam: float, flow: bool) -> float:
    """The sigma whose half log-SNR is `lam` (inverse of `half_log_snr`)."""
    return 1 / (1 + math.exp(lam)) if flow else math.exp(-lam)


def flow_safe_sigmas(sig: list[float], flow: bool) -> list[float]:
    """A flow schedule starting at sigma 1 (infinite -lambda) starts at 1 - 1e-4 instead, as ComfyUI does."""
    return [min(sig[0], 1 - 1e-4), *sig[1:]] if flow and sig[0] >= 1 else sig


def report(callback: Callback | None, x, i: int, sigma: float, sigma_hat: float, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, i, sigmas, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al. 2022, Algorithm 2 lines 5-7: raise the noise level to sigma_hat."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _midpoint(sigma_a: float, sigma_b: float) -> float:
    """Geometric mean: the midpoint in log-sigma."""
    return math.exp(0.5 * (math.log(sigma_a) + math.log(sigma_b)))


# ---- Euler family ----------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0) -> torch.Tensor:
    """Euler method on the probability-flow ODE; Karras et al. 2022 Algorithm 2 without the Heun
    correction (stochastic churn when s_churn > 0)."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        x, sigma_hat = _churn(x, i, sig, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoise(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to sigma_down, then fresh noise sigma_up.

    `flow`: rectified-flow models (FLUX.1, SD3.5) split the step with `get_ancestral_step_rf`."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up, scale = ancestral_step(sigma, sigma_next, eta, flow)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = scale * x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0) -> torch.Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Algorithm 2 (Euler on the last step)."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        x, sigma_hat = _churn(x, i, sig, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoise(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sig[i + 1], denoise(model, x_2, sig[i + 1], extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022) as in k-diffusion: the derivative is taken at the
    log-sigma midpoint (Karras et al. 2022, Algorithm 2 variant)."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        x, sigma_hat = _churn(x, i, sig, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoise(model, x, sigma_hat, extra_args)
        report(callback, x, i, sig[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = _midpoint(sigma_hat, sig[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, denoise(model, x_2, sigma_mid, extra_args))
        x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Ancestral DPM-Solver-2: a midpoint step down to sigma_down, then fresh noise sigma_up."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up, scale = ancestral_step(sigma, sigma_next, eta, flow)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoise(model, x_2, sigma_mid, extra_args))
            x = x + d_2 * (sigma_down - sigma)
        if sigma_up > 0:
            x = scale * x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


# ---- linear multistep ------------------------------------------------------


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for the step sigmas[i] -> sigmas[i+1].

    Weight j integrates, exactly, the Lagrange basis polynomial that is 1 at
    sigmas[i - j] and 0 at the other `order - 1` previous nodes.
    """
    nodes = [sigmas[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        denom = float(np.prod([nodes[j] - r for r in others])) if others else 1.0
        basis = np.polynomial.Polynomial.fromroots(others) / denom if others else np.polynomial.Polynomial([1.0])
        integral = basis.integ()
        coeffs.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return coeffs


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma, order 4) as in k-diffusion's sample_lms."""
    if order < 1:
        raise InvalidParams(f"LMS order must be >= 1, got {order}.")
    sig = sigma_list(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoise(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        ds = [to_d(x, sig[i], denoised), *ds][:order]  # newest first
        coeffs = lms_coefficients(sig, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coeffs, ds, strict=True))
    return x


# ---- DDIM and LCM ----------------------------------------------------------


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in the sigma parameterisation x = x_t / sqrt(alpha_t).

    With eps = (x - denoised) / sigma the update is
    `x_next = denoised + sqrt(sigma_next^2 - s^2) * eps + s * z`, where
    s = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t rescaled;
    eta = 0 is exactly an Euler step. Use it with the "ddim" schedule for DDIM timesteps.
    """
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        eps = (x - denoised) / sigma
        s = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - sigma_next**2 / sigma**2, 0.0)))
        x = denoised + eps * math.sqrt(max(sigma_next**2 - s**2, 0.0))
        if s > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * s
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None,
               noise_sampler=None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1):
    jump to the denoised estimate, then re-noise to the next level."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        denoised = denoise(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + noise_sampler(sig[i], sig[i + 1]) * sig[i + 1]
    return x
