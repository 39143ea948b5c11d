"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in k-diffusion's sigma space: "DPM fast" and
"DPM adaptive", as A1111 runs them.

The solver integrates the noise prediction eps = (x - D) / sigma in t = -log(sigma) from
sigma_max down to sigma_min, and returns x at sigma_min (it never steps to sigma 0), as
k-diffusion does. Our samplers take the schedule's sigmas: sigma_max is the first, sigma_min the
smallest positive one and "DPM fast" spends exactly `len(sigmas) - 1` model calls, which is how
A1111 calls them (`n = steps`, the schedule's range). The step sizes are the solver's own.
The calling convention is the one described in `modules.sampling.samplers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from modules.errors import InvalidParams
from modules.sampling.samplers import default_noise_sampler, get_ancestral_step, sigma_list


def _sigma(t: float) -> float:
    return math.exp(-t)


def _t(sigma: float) -> float:
    return -math.log(sigma)


@dataclass
class _Solver:
    """Single-step DPM-Solver-1/2/3 with one eps cache per step."""

    model: object
    extra_args: dict
    cache: dict = field(default_factory=dict)

    def eps(self, key: str, x: torch.Tensor, t: float) -> torch.Tensor:
        if key not in self.cache:
            sigma = _sigma(t)
            denoised = self.model(x, x.new_full((x.shape[0],), sigma), **self.extra_args)
            self.cache[key] = (x - denoised) / sigma
        return self.cache[key]

    def step_1(self, x, t: float, t_next: float) -> torch.Tensor:
        return x - _sigma(t_next) * math.expm1(t_next - t) * self.eps("eps", x, t)

    def step_2(self, x, t: float, t_next: float, r1: float = 0.5) -> torch.Tensor:
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t: float, t_next: float, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
              - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps("eps_r2", u2, s2)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _range(sigmas) -> tuple[float, float]:
    """(sigma_min, sigma_max): the smallest positive and the first sigma."""
    sig = sigma_list(sigmas)
    positive = [s for s in sig if s > 0]
    if len(positive) < 2:
        raise InvalidParams("DPM fast and DPM adaptive need at least two noise levels above 0: "
                            "use more steps (or, in img2img, a higher denoising strength).")
    return min(positive), sig[0]


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """The deterministic target t_next_ <= t_end and the noise sigma_up that brings it back to t_next."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = min(t_end, _t(sigma_down)) if sigma_down > 0 else t_end
    return t_next_, math.sqrt(max(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2, 0.0))


def _report(callback, x, i, t, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": _sigma(t), "sigma_hat": _sigma(t), "denoised": denoised})


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                    eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-fast: `len(sigmas) - 1` model calls spent on order-3 steps, uniform in t, ending
    with an order-1/2 step; ancestral noise when eta > 0."""
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sigma_min, sigma_max = _range(sigmas)
    nfe = len(sigmas) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        solver = _Solver(model, extra_args or {})
        t, t_next = ts[i], ts[i + 1]
        t_next_, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps("eps", x, t)
        _report(callback, x, i, t, x - _sigma(t) * eps)
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, t_next_)
        if sigma_up > 0:
            x = x + sigma_up * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


class _PID:
    """k-diffusion's PID step-size controller (Söderlind 2003), on the inverse error."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv_error = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-12/23 with adaptive steps: an order-(p-1) and an order-p step are compared and a
    PID controller sizes the next step. The number of model calls depends on the tolerances."""
    if order not in (2, 3):
        raise InvalidParams(f"DPM adaptive order must be 2 or 3, got {order}.")
    if eta < 0:
        raise InvalidParams(f"eta must be >= 0, got {eta}.")
    sigma_min, sigma_max = _range(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s, t_end = _t(sigma_max), _t(sigma_min)
    x_prev, steps = x, 0
    pid = _PID(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5:
        solver = _Solver(model, extra_args or {})
        t = min(t_end, s + pid.h)
        t_, sigma_up = _ancestral_target(s, t, t_end, eta)
        denoised = x - _sigma(s) * solver.eps("eps", x, s)
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_), solver.step_2(x, s, t_)
        else:
            x_low, x_high = solver.step_2(x, s, t_, r1=1 / 3), solver.step_3(x, s, t_)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev = x_low
            x = x_high
            if sigma_up > 0:
                x = x + sigma_up * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
        _report(callback, x, steps, s, denoised)
        steps += 1
    return x
