"""More k-diffusion-style samplers: Restart (A1111), PLMS (A1111), and ComfyUI's iPNDM, DEIS,
Res Multistep and ER-SDE.

All work in k-diffusion's sigma space (x = x_vp * sqrt(1 + sigma^2)), where eps = d =
(x - D) / sigma is the ODE derivative dx/dsigma. The calling convention is the one described
in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math

import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import (
    default_noise_sampler,
    denoise,
    get_ancestral_step,
    lms_coefficients,
    report,
    sigma_list,
    to_d,
)

# Fixed-step Adams-Bashforth weights, newest derivative first (orders 1-4).
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. 5: n levels from sigma_max to sigma_min (no trailing 0)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + k / max(n - 1, 1) * (lo - hi)) ** rho for k in range(n)]


def _nearest(sigmas: list[float], value: float) -> int:
    return min(range(len(sigmas)), key=lambda k: abs(sigmas[k] - value))


def restart_steps(sig: list[float], restart_list: dict | None) -> list[tuple[float, float]]:
    """A1111's Restart plan: the (from, to) steps, with restart segments going back up.

    Automatic (`restart_list=None`): from 20 steps, a Karras schedule of `steps - k * n` steps
    plus `n` restarts of `k` steps from sigma 2 back to sigma 0.1 (k = 9, n = 1; from 36 steps
    k = steps // 4, n = 2). `restart_list` maps a sigma to [steps + 1, times, max sigma].
    """
    steps = len(sig) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            k, n = (steps // 4, 2) if steps >= 36 else (9, 1)
            sig = [*karras_sigmas(steps - k * n, sig[-2], sig[0]), 0.0]
            restart_list = {0.1: [k + 1, n, 2.0]}
    at = {_nearest(sig, key): value for key, value in restart_list.items()}
    plan: list[tuple[float, float]] = []
    for i in range(len(sig) - 1):
        plan.append((sig[i], sig[i + 1]))
        if i + 1 in at:
            count, times, top = at[i + 1]
            top_index = _nearest(sig, float(top))
            if top_index < i + 1:
                levels = karras_sigmas(int(count), sig[i + 1], sig[top_index])
                plan.extend(list(zip(levels[:-1], levels[1:], strict=True)) * int(times))
    return plan


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                   s_noise: float = 1.0, restart_list: dict | None = None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, arXiv:2306.14878) as in A1111: Heun steps, and at each
    restart fresh noise takes x from the level reached back up to the restart's top level."""
    noise_sampler = noise_sampler or default_noise_sampler(x)

    def renoise(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x + noise_sampler(low, high) * s_noise * math.sqrt(high**2 - low**2)

    return heun_restart_steps(model, x, restart_steps(sigma_list(sigmas), restart_list), renoise, extra_args,
                              callback)


def heun_restart_steps(model, x, plan, renoise, extra_args=None, callback=None) -> torch.Tensor:
    """Heun steps over the (sigma, sigma_next) pairs of a restart `plan`; where the plan goes back up,
    `renoise(x, low, high)` takes x from the level reached to the restart's top level."""
    last = None
    for i, (sigma, sigma_next) in enumerate(plan):
        if last is not None and last < sigma:
            x = renoise(x, last, sigma)
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = to_d(x_2, sigma_next, denoise(model, x_2, sigma_next, extra_args))
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        last = sigma_next
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None,
                noise_sampler=None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods"), as latent diffusion's and A1111's.

    Fixed-step Adams-Bashforth on eps (up to 4th order); the first step is a pseudo improved
    Euler (eps averaged with one at the Euler point), so it calls the model steps + 1 times.
    In sigma space a DDIM transfer with eps' is the Euler move x + (sigma_next - sigma) * eps'.
    """
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        eps = to_d(x, sigma, denoised)
        if not history and sigma_next > 0:
            x_euler = x + eps * (sigma_next - sigma)
            eps_prime = (eps + to_d(x_euler, sigma_next, denoise(model, x_euler, sigma_next, extra_args))) / 2
        else:
            weights = ADAMS_BASHFORTH[len(history)]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *history], strict=False))
        x = x + eps_prime * (sigma_next - sigma)
        history = [eps, *history][:3]
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 max_order: int = 4) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS paper): fixed-step Adams-Bashforth on d up to
    `max_order`, warming up from Euler; the step to sigma 0 returns the denoised estimate."""
    if not 1 <= max_order <= 4:
        raise InvalidParams(f"iPNDM max_order must be 1 to 4, got {max_order}.")
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            weights = ADAMS_BASHFORTH[min(len(history) + 1, max_order) - 1]
            x = x + (sigma_next - sigma) * sum(w * e for w, e in zip(weights, [d, *history], strict=False))
        history = [d, *history][:max_order - 1]
    return x


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                max_order: int = 3) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023) in its rho-AB form: with alpha = 1 the exponential integrator is
    exact in sigma and d is extrapolated by the Lagrange polynomial through the last
    `max_order` points (variable-step Adams-Bashforth in sigma); the step to sigma 0 is Euler."""
    if not 1 <= max_order <= 4:
        raise InvalidParams(f"DEIS max_order must be 1 to 4, got {max_order}.")
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        history = [to_d(x, sigma, denoised), *history][:max_order]
        order = 1 if sigma_next == 0 else len(history)
        coeffs = lms_coefficients(sig, i, order)
        x = x + sum(c * d for c, d in zip(coeffs, history, strict=False))
    return x


def _phi1(h: float) -> float:
    return math.expm1(h) / h


def _phi2(h: float) -> float:
    return (_phi1(h) - 1) / h


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                         eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """RES multistep (Zhang et al. 2023, arXiv:2308.02157): the 2nd-order exponential multistep
    step in t = -log(sigma) with phi-function weights, as ComfyUI's res_multistep; eta > 0
    makes it ancestral (ComfyUI's res_multistep_ancestral)."""
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, old_sigma_down = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            c2 = (math.log(old_sigma_down) - math.log(sig[i - 1])) / h
            b2 = _phi2(-h) / c2
            b1 = _phi1(-h) - b2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def er_sde_noise_scaler(lam: torch.Tensor | float):
    """ER-SDE's default noise scale function (the paper's "ER-SDE 5"): lambda * (e^(lambda^0.3) + 10)."""
    return lam * (math.exp(lam**0.3) + 10.0) if isinstance(lam, float) else lam * (torch.exp(lam**0.3) + 10.0)


def _er_integrals(lam_s: float, lam_t: float, points: int = 200) -> tuple[float, float]:
    """Riemann sums (as the reference code) of 1/f and (lambda - lambda_s)/f over [lambda_t, lambda_s]."""
    step = (lam_s - lam_t) / points
    pos = lam_t + torch.arange(points, dtype=torch.float64) * step
    scaled = er_sde_noise_scaler(pos)
    return float((1 / scaled).sum()) * step, float(((pos - lam_s) / scaled).sum()) * step


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                  s_noise: float = 1.0, max_stage: int = 3) -> torch.Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169) with alpha = 1 (lambda = sigma), as
    ComfyUI's er_sde: a stage-1 step scaled by the noise function's ratio, stage 2/3 corrections
    from finite differences of the denoised estimates, then noise."""
    if not 1 <= max_stage <= 3:
        raise InvalidParams(f"ER-SDE max_stage must be 1 to 3, got {max_stage}.")
    sig = sigma_list(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised = old_denoised_d = None
    for i in range(len(sig) - 1):
        lam_s, lam_t = sig[i], sig[i + 1]
        denoised = denoise(model, x, lam_s, extra_args)
        report(callback, x, i, lam_s, lam_s, denoised)
        stage = min(max_stage, i + 1)
        if lam_t == 0:
            x = denoised
            old_denoised = denoised
            continue
        r = er_sde_noise_scaler(lam_t) / er_sde_noise_scaler(lam_s)
        x = r * x + (1 - r) * denoised
        if stage >= 2:
            dt = lam_t - lam_s
            s, s_u = _er_integrals(lam_s, lam_t)
            denoised_d = (denoised - old_denoised) / (lam_s - sig[i - 1])
            x = x + (dt + s * er_sde_noise_scaler(lam_t)) * denoised_d
            if stage >= 3:
                denoised_u = (denoised_d - old_denoised_d) / ((lam_s - sig[i - 2]) / 2)
                x = x + (dt**2 / 2 + s_u * er_sde_noise_scaler(lam_t)) * denoised_u
            old_denoised_d = denoised_d
        scale = math.sqrt(max(lam_t**2 - lam_s**2 * r**2, 0.0))
        if s_noise > 0 and scale > 0:
            x = x + noise_sampler(lam_s, lam_t) * s_noise * scale
        old_denoised = denoised
    return x


def _timestep(table: torch.Tensor, sigma: float) -> int:
    """The model's discrete timestep nearest to sigma in log space (`table` ascending, one per timestep)."""
    return int(torch.argmin((table.log() - math.log(sigma)).abs()))


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               gamma: float = 0.3, model_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024), as
    diffusers' TCDScheduler: jump to the level of timestep s = floor((1 - gamma) * t_next) along the
    predicted eps, then add fresh noise up to sigma_next. gamma = 0 is DDIM; the last step lands on
    the model's smallest sigma. `model_sigmas` is the model's ascending sigma table (the pipeline
    passes it to samplers that take it)."""
    if not 0 <= gamma <= 1:
        raise InvalidParams(f"TCD gamma must be between 0 and 1, got {gamma}.")
    sig = sigma_list(sigmas)
    if model_sigmas is None or len(model_sigmas) < 2:
        raise InvalidParams("TCD needs the model's sigma table (model_sigmas).")
    table = torch.as_tensor(model_sigmas, dtype=torch.float64).flatten().cpu()
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        t_next = _timestep(table, sigma_next) if sigma_next > 0 else 0
        sigma_s = min(float(table[math.floor((1 - gamma) * t_next)]), sigma_next or math.inf)
        x = denoised + to_d(x, sigma, denoised) * sigma_s
        if sigma_next > 0 and sigma_next > sigma_s:
            x = x + noise_sampler(sigma, sigma_next) * math.sqrt(sigma_next**2 - sigma_s**2)
    return x
