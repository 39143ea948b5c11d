"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver", arXiv:2309.05019), data
prediction in k-diffusion's sigma space (alpha = 1, lambda = -log sigma), as ComfyUI's sa_solver:
a stochastic Adams-Bashforth predictor (order 3) and Adams-Moulton corrector (order 4), with
noise of strength tau = eta inside the middle of the schedule (between 20 % and 80 % of the
model's timesteps) and tau = 0 (an ODE solver) outside it. One model call per step.

The step from lambda_s to lambda_t with data predictions D_j at nodes lambda_j is
    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + sum_j b_j D_j + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,
    b_j = (1 + tau^2) * integral over [lambda_s, lambda_t] of e^{(1 + tau^2)(lambda - lambda_t)} l_j(lambda),
with l_j the Lagrange basis on the nodes; the integrals are taken by Gauss-Legendre quadrature
(exact to rounding for these smooth integrands). The calling convention is the one described
in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import default_noise_sampler, denoise, report, sigma_list

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


def adams_coefficients(nodes: list[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """b_j for the Lagrange basis on `nodes` over the step lambda_s -> lambda_t (alpha = 1)."""
    half = (lam_t - lam_s) / 2
    lam = half * _NODES + (lam_t + lam_s) / 2
    k = 1 + tau**2
    weighted = _WEIGHTS * half * k * np.exp(k * (lam - lam_t))
    coeffs = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(lam)
        for m, other in enumerate(nodes):
            if m != j:
                basis = basis * (lam - other) / (node - other)
        coeffs.append(float(np.sum(weighted * basis)))
    return coeffs


def percent_to_sigma(table: torch.Tensor, percent: float) -> float:
    """The sigma `percent` of the way through the model's timesteps (0: the noisiest), log-interpolated."""
    t = (1 - percent) * (len(table) - 1)
    low = min(int(math.floor(t)), len(table) - 2)
    w = t - low
    return math.exp((1 - w) * math.log(float(table[low])) + w * math.log(float(table[low + 1])))


def _update(x, sigma_s: float, sigma_t: float, tau: float, preds: list[torch.Tensor], nodes: list[float]):
    lam_s, lam_t = -math.log(sigma_s), -math.log(sigma_t)
    coeffs = adams_coefficients(nodes, lam_s, lam_t, tau)
    x = (sigma_t / sigma_s) * math.exp(-(tau**2) * (lam_t - lam_s)) * x
    return x + sum(c * d for c, d in zip(coeffs, preds, strict=True))


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     eta: float = 1.0, s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4,
                     model_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """SA-Solver predictor-corrector; `model_sigmas` (the model's ascending sigma table) places the
    stochastic interval, which is the whole schedule without it. eta = 0 is a deterministic solver."""
    if not (1 <= predictor_order <= 4 and 1 <= corrector_order <= 4):
        raise InvalidParams("SA-Solver orders must be 1 to 4.")
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    top, bottom = math.inf, 0.0
    if model_sigmas is not None:
        table = torch.as_tensor(model_sigmas, dtype=torch.float64).flatten().cpu()
        top, bottom = percent_to_sigma(table, 0.2), percent_to_sigma(table, 0.8)
    n, keep = len(sig) - 1, max(predictor_order, corrector_order)
    to_zero = sig[-1] == 0
    lams = [-math.log(s) if s > 0 else math.inf for s in sig]
    x_pred, preds, tau, noise = x, [], 0.0, None
    for i in range(n):
        denoised = denoise(model, x_pred, sig[i], extra_args)
        report(callback, x_pred, i, sig[i], sig[i], denoised)
        preds = [*preds, denoised][-keep:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or sig[i + 1] == 0 else min(corrector_order, len(preds))
        if to_zero:
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)
        if c_order:  # correct the last step, from the last corrected state, with the new prediction
            x = _update(x, sig[i - 1], sig[i], tau, preds[-c_order:], lams[i - c_order + 1:i + 1])
            if noise is not None:
                x = x + noise
        else:
            x = x_pred
        if sig[i + 1] == 0:
            x_pred = denoised
            continue
        tau = eta if top >= sig[i + 1] >= bottom else 0.0
        x_pred = _update(x, sig[i], sig[i + 1], tau, preds[-p_order:], lams[i - p_order + 1:i + 1])
        noise = None
        if tau > 0 and s_noise > 0:
            h = lams[i + 1] - lams[i]
            noise = noise_sampler(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h)) * s_noise
            x_pred = x_pred + noise
    return x_pred
