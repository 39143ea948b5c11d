"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion's sigma space.

With alpha = 1 the half log-SNR is lambda = -log(sigma), written t below as in
k-diffusion, and the step size is h = t_next - t. The calling convention is the one
described in `modules.sampling.samplers`.

`flow=True` (FLUX.1, SD3.5: x = (1 - sigma) x0 + sigma noise) runs the same solvers with alpha = 1 - sigma:
lambda = log(alpha / sigma), every data term scaled by the target's alpha, noise as sigma_next times the
unit-variance factor, as ComfyUI does for CONST models; DPM++ 2S a takes the rectified-flow ancestral split.
"""
from __future__ import annotations

import math

import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import (
    ancestral_step,
    default_noise_sampler,
    denoise,
    flow_safe_sigmas,
    get_ancestral_step,
    half_log_snr,
    report,
    sigma_list,
    sigma_of,
    to_d,
)


def _t(sigma: float) -> float:
    return -math.log(sigma)


def _sigma(t: float) -> float:
    return math.exp(-t)


def _alpha(sigma: float, flow: bool) -> float:
    return 1 - sigma if flow else 1.0


def _first_order(x, denoised, sigma: float, sigma_to: float, flow: bool):
    """DPM-Solver++(1) from sigma to sigma_to: (sigma_to / sigma) x + (alpha_to - sigma_to alpha / sigma) D."""
    ratio = sigma_to / sigma
    return ratio * x + (_alpha(sigma_to, flow) - ratio * _alpha(sigma, flow)) * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0,
                              flow: bool = False) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S): single-step 2nd order to sigma_down (r = 1/2), then noise sigma_up."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up, scale = ancestral_step(sigma, sigma_next, eta, flow)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            lam = half_log_snr(flow_safe_sigmas([sigma], flow)[0], flow)
            sigma_s = sigma_of(lam + (half_log_snr(sigma_down, flow) - lam) / 2, flow)
            x_2 = _first_order(x, denoised, sigma, sigma_s, flow)
            x = _first_order(x, denoise(model, x_2, sigma_s, extra_args), sigma, sigma_down, flow)
        if sigma_up > 0:
            x = scale * x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def _ancestral_dpm1(x, denoised, sigma: float, lam_to: float, eta: float, flow: bool):
    """DPM-Solver-1 from sigma to lambda_to with k-diffusion's ancestral split taken on the VE sigmas
    exp(-lambda) (x / alpha of a flow process is a VE one). Returns (x without the noise, the noise's std)."""
    lam = half_log_snr(sigma, flow)
    down, up = get_ancestral_step(math.exp(-lam), math.exp(-lam_to), eta)
    alpha, alpha_to = _alpha(sigma, flow), _alpha(sigma_of(lam_to, flow), flow)
    ratio = down / math.exp(-lam)  # exp(-h) of the deterministic part
    return (alpha_to / alpha) * ratio * x + alpha_to * (1 - ratio) * denoised, alpha_to * up


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde with r = 1/2.

    Two ancestral half-steps per step. Without k-diffusion's Brownian tree, the noise of
    the full step is built from the two half-step draws as Brownian increments in sigma,
    z = (z_1 sqrt(sigma - sigma_s) + z_2 sqrt(sigma_s - sigma_next)) / sqrt(sigma - sigma_next),
    which keeps the tree's correlation between the half-step and full-step noise.
    """
    sig = flow_safe_sigmas(sigma_list(sigmas), flow)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        lam, lam_next = half_log_snr(sigma, flow), half_log_snr(sigma_next, flow)
        sigma_s = sigma_of((lam + lam_next) / 2, flow)
        # first half: ancestral DPM-Solver-1 step to the midpoint
        x_2, up = _ancestral_dpm1(x, denoised, sigma, (lam + lam_next) / 2, eta, flow)
        z_1 = noise_sampler(sigma, sigma_s) if eta else None
        if up > 0:
            x_2 = x_2 + z_1 * s_noise * up
        denoised_2 = denoise(model, x_2, sigma_s, extra_args)
        # second half: the full step using the midpoint's denoised estimate
        x, up = _ancestral_dpm1(x, denoised_2, sigma, lam_next, eta, flow)
        if up > 0:
            z_2 = noise_sampler(sigma_s, sigma_next)
            z = (z_1 * math.sqrt(sigma - sigma_s) + z_2 * math.sqrt(sigma_s - sigma_next)) / math.sqrt(sigma - sigma_next)
            x = x + z * s_noise * up
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
                        solver_type: str = "midpoint", flow: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the multistep 2nd-order solver of the SDE with eta-scaled noise.

    `solver_type` "midpoint" (default) or "heun" picks the 2nd-order correction.
    """
    if solver_type not in ("midpoint", "heun"):
        raise InvalidParams(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}.")
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sig = flow_safe_sigmas(sigma_list(sigmas), flow)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = half_log_snr(sigma_next, flow) - half_log_snr(sigma, flow)
        eta_h = eta * h
        alpha_next = _alpha(sigma_next, flow)
        phi = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + alpha_next * phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "midpoint":
                x = x + alpha_next * 0.5 * phi / r * (denoised - old_denoised)
            else:
                x = x + alpha_next * (phi / (-h - eta_h) + 1) / r * (denoised - old_denoised)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion): multistep 3rd order with eta-scaled noise."""
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sig = flow_safe_sigmas(sigma_list(sigmas), flow)
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
        h = half_log_snr(sigma_next, flow) - half_log_snr(sigma, flow)
        h_eta = h * (eta + 1)
        alpha_next = _alpha(sigma_next, flow)
        x = (sigma_next / sigma) * math.exp(-h * eta) * x - alpha_next * math.expm1(-h_eta) * denoised
        phi_2 = (math.expm1(-h_eta) / h_eta + 1) * alpha_next
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5 * alpha_next
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
