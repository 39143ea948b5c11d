"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance").

A CFG++ step takes the guided prediction as the clean estimate but re-noises along the
*unconditional* one. The model handed to samplers is called as usual (so every denoiser
wrapper applies) and afterwards offers the latest call's unconditional prediction as
`model.last_uncond` (CFGDenoiser sets it; wrappers forward attributes). Where it is missing,
or None because CFG scale 1 skipped the uncond, these samplers are their plain versions.
The calling convention is the one described in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math

import torch

from modules.sampling.samplers import default_noise_sampler, denoise, report, sigma_list

A1111_CFGPP_SCALE = 1 / 12.5  # A1111's DDIM CFG++ maps CFG 0..12.5 onto CFG++'s guidance 0..1


def guided_denoise(model, x: torch.Tensor, sigma: float, extra_args: dict | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided, uncond) predictions at one noise level; uncond is the guided one without CFG."""
    denoised = denoise(model, x, sigma, extra_args)
    uncond = getattr(model, "last_uncond", None)
    return denoised, (denoised if uncond is None else uncond)


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        noise_sampler=None) -> torch.Tensor:
    """Euler CFG++ (ComfyUI's euler_cfg_pp): x_next = guided + sigma_next * (x - uncond) / sigma.
    Use a CFG scale of about 1 to 2."""
    sig = sigma_list(sigmas)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = guided_denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        x = denoised + (x - uncond) * (sigma_next / sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           noise_sampler=None) -> torch.Tensor:
    """DPM-Solver++(2M) CFG++ (ComfyUI's dpmpp_2m_cfg_pp): the 2M step re-noised along the
    uncond prediction, with the multistep correction from the previous uncond."""
    sig = sigma_list(sigmas)
    old_uncond = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = guided_denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        ratio = sigma_next / sigma  # e^-h
        x = denoised + ratio * (x - uncond)
        if old_uncond is not None and sigma_next > 0:
            h = math.log(sigma) - math.log(sigma_next)
            r = (math.log(sig[i - 1]) - math.log(sigma)) / h
            x = x - math.expm1(-h) / (2 * r) * (denoised - old_uncond)
        old_uncond = uncond
    return x


@torch.no_grad()
def sample_ddim_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                       eta: float = 0.0, s_noise: float = 1.0, cfg_pp_scale: float = A1111_CFGPP_SCALE
                       ) -> torch.Tensor:
    """DDIM CFG++ as A1111's: the guidance (guided - uncond) is scaled by `cfg_pp_scale` (1/12.5),
    then a DDIM step re-noised along the uncond's eps; eta adds DDIM's noise."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = guided_denoise(model, x, sigma, extra_args)
        guided = uncond + (denoised - uncond) * cfg_pp_scale if denoised is not uncond else denoised
        report(callback, x, i, sigma, sigma, guided)
        eps_uncond = (x - uncond) / sigma
        s = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - sigma_next**2 / sigma**2, 0.0)))
        x = guided + eps_uncond * math.sqrt(max(sigma_next**2 - s**2, 0.0))
        if s > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * s
    return x
