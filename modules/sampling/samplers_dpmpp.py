"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion's sigma space.

With alpha = 1 the half log-SNR is lambda = -log(sigma), written t below as in
k-diffusion, and the step size is h = t_next - t. The calling convention is the one
described in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math

import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import (
    default_noise_sampler,
    denoise,
    get_ancestral_step,
    report,
    sigma_list,
    to_d,
)


def _t(sigma: float) -> float:
    return -math.log(sigma)


def _sigma(t: float) -> float:
    return math.exp(-t)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S): single-step 2nd order to sigma_down (r = 1/2), then noise sigma_up."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoise(model, x_2, _sigma(s), extra_args)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde with r = 1/2.

    Two ancestral half-steps per step. Without k-diffusion's Brownian tree, the noise of
    the full step is built from the two half-step draws as Brownian increments in sigma,
    z = (z_1 sqrt(sigma - sigma_s) + z_2 sqrt(sigma_s - sigma_next)) / sqrt(sigma - sigma_next),
    which keeps the tree's correlation between the half-step and full-step noise.
    """
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        sigma_s = _sigma(t + (t_next - t) / 2)
        # first half: ancestral DPM-Solver-1 step to the midpoint
        s_down, s_up = get_ancestral_step(sigma, sigma_s, eta)
        x_2 = (s_down / sigma) * x - math.expm1(t - _t(s_down)) * denoised
        z_1 = noise_sampler(sigma, sigma_s) if eta else None
        if s_up > 0:
            x_2 = x_2 + z_1 * s_noise * s_up
        denoised_2 = denoise(model, x_2, sigma_s, extra_args)
        # second half: the full step using the midpoint's denoised estimate
        n_down, n_up = get_ancestral_step(sigma, sigma_next, eta)
        x = (n_down / sigma) * x - math.expm1(t - _t(n_down)) * denoised_2
        if n_up > 0:
            z_2 = noise_sampler(sigma_s, sigma_next)
            z = (z_1 * math.sqrt(sigma - sigma_s) + z_2 * math.sqrt(sigma_s - sigma_next)) / math.sqrt(sigma - sigma_next)
            x = x + z * s_noise * n_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    noise_sampler=None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: multistep 2nd order, deterministic."""
    sig = sigma_list(sigmas)
    old_denoised = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = _t(sigma_next) - _t(sigma)
            denoised_d = denoised
            if old_denoised is not None:
                r = (_t(sigma) - _t(sig[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the multistep 2nd-order solver of the SDE with eta-scaled noise.

    `solver_type` "midpoint" (default) or "heun" picks the 2nd-order correction.
    """
    if solver_type not in ("midpoint", "heun"):
        raise InvalidParams(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}.")
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "midpoint":
                x = x + 0.5 * phi / r * (denoised - old_denoised)
            else:
                x = x + (phi / (-h - eta_h) + 1) / r * (denoised - old_denoised)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion): multistep 3rd order with eta-scaled noise."""
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
