"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator") in
ComfyUI's default "tab" form, and the "rhoab" form.

Both are Adams-Bashforth steps on d = dx/dsigma in k-diffusion's sigma space: the next x is
x + sum_j c_j * d_{i-j}, with c_j the integral over the step of the Lagrange basis polynomial
through the last `order` nodes. They differ in the variable the polynomial is built in:

- "tab" (ComfyUI's default): the VP time t of the schedule ComfyUI maps sigmas onto
  (sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1, fitted so that sigma(1e-3) = 0.002 and
  sigma(1) = 80), integrated against dsigma. ComfyUI sums 10,000 rectangles per step; here
  the integral is taken by Gauss-Legendre quadrature in sigma, exact to float64 rounding.
- "rhoab": the polynomial in sigma itself, integrated in closed form (`samplers_extra.sample_deis`).

The step to sigma 0 is Euler in both.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from modules.errors import InvalidParams
from modules.sampling import samplers_extra
from modules.sampling.samplers import denoise, report, sigma_list, to_d

DEIS_MODES = ("tab", "rhoab")
VP_EPS, VP_SIGMA_MIN, VP_SIGMA_MAX = 1e-3, 0.002, 80.0  # the EDM range ComfyUI's VP time is fitted to
QUADRATURE_POINTS = 32


def vp_betas() -> tuple[float, float]:
    """(beta_min, beta_d) of the VP schedule with sigma(VP_EPS) = VP_SIGMA_MIN and sigma(1) = VP_SIGMA_MAX."""
    log_lo, log_hi = math.log1p(VP_SIGMA_MIN**2), math.log1p(VP_SIGMA_MAX**2)
    beta_d = 2 * (log_lo / VP_EPS - log_hi) / (VP_EPS - 1)
    return log_hi - beta_d / 2, beta_d


def vp_time(sigma: np.ndarray | float) -> np.ndarray | float:
    """The VP time of a sigma: the root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
    beta_min, beta_d = vp_betas()
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d


def tab_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Weights of d_i, d_{i-1}, ... for the step sigmas[i] -> sigmas[i + 1]: the Lagrange basis in
    VP time through the last `order` nodes, integrated over sigma."""
    if order == 1:
        return [sigmas[i + 1] - sigmas[i]]
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_POINTS)
    lo, hi = sigmas[i + 1], sigmas[i]
    at = vp_time((hi - lo) / 2 * nodes + (hi + lo) / 2)
    scale = -(hi - lo) / 2  # integrating from sigmas[i] down to sigmas[i + 1]
    times = [float(vp_time(sigmas[i - k])) for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.ones_like(at)
        for k in range(order):
            if k != j:
                basis *= (at - times[k]) / (times[j] - times[k])
        coeffs.append(float(scale * np.dot(weights, basis)))
    return coeffs


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                max_order: int = 3, deis_mode: str = "tab") -> torch.Tensor:
    """DEIS with up to `max_order` derivatives (order grows by one a step from Euler)."""
    if not 1 <= max_order <= 4:
        raise InvalidParams(f"DEIS max_order must be 1 to 4, got {max_order}.")
    if deis_mode not in DEIS_MODES:
        raise InvalidParams(f"DEIS deis_mode must be one of {', '.join(DEIS_MODES)}, got {deis_mode!r}.")
    if deis_mode == "rhoab":
        return samplers_extra.sample_deis(model, x, sigmas, extra_args, callback, disable, noise_sampler, max_order)
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoise(model, x, sig[i], extra_args)
        report(callback, x, i, sig[i], sig[i], denoised)
        history = [to_d(x, sig[i], denoised), *history][:max_order]
        order = 1 if sig[i + 1] == 0 else len(history)
        x = x + sum(c * d for c, d in zip(tab_coefficients(sig, i, order), history, strict=False))
    return x
