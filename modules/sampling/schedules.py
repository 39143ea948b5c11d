"""Noise schedules: functions `(steps, context) -> sigmas`.

Every schedule returns `steps + 1` descending float32 sigmas ending in 0, on
`context.device`. The formulas follow k-diffusion and A1111 v1.10
(`modules/sd_schedulers.py`); where we deliberately differ it is noted on the
function. "Automatic" is not a schedule of its own: `resolve_scheduler` maps it
to the sampler's `default_scheduler`, and calling its function raises.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from modules.errors import InvalidParams
from modules.sampling.specs import SamplerSpec, ScheduleContext, SchedulerSpec

# Align Your Steps 10-step tables (Sabour et al. 2024), as A1111 v1.10 ships them:
# 11 noise levels rounded to 3 decimals. NVIDIA's published values differ by < 1.5%.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
BETA_ALPHA = 0.6  # A1111's defaults for opts.beta_dist_alpha / beta_dist_beta
BETA_BETA = 0.6


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000
) -> torch.Tensor:
    """SD's training schedule: betas linear in sqrt space (float32, as LDM and diffusers)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DiscreteSchedule:
    """A model's discrete noise levels, with k-diffusion's t <-> sigma conversion.

    `sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`, ascending in t.
    Conversions interpolate log-sigma linearly between neighbouring timesteps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self._init_from_sigmas(((1 - ac) / ac).sqrt())

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> DiscreteSchedule:
        """Build from an ascending sigma table (e.g. `ScheduleContext.model_sigmas`)."""
        obj = cls.__new__(cls)
        obj._init_from_sigmas(torch.as_tensor(sigmas, dtype=torch.float64))
        return obj

    def _init_from_sigmas(self, sigmas: torch.Tensor) -> None:
        sigmas = sigmas.detach().cpu().flatten()
        if sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool(sigmas[0] > 0):
            raise InvalidParams("A model's sigma table must be positive and strictly ascending.")
        self._log_sigmas = sigmas.log()
        self._device_tables: dict[torch.device, torch.Tensor] = {sigmas.device: self._log_sigmas}
        self.sigmas = sigmas.float()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def __len__(self) -> int:
        return self.sigmas.numel()

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep for each sigma, clamped to [0, len - 1].

        Computed on the sigma's own device: a copy to the CPU and back would make a GPU wait
        for its queue to drain before every UNet call.
        """
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.detach().to(log_sigmas.dtype).log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(self) - 1)
        low = high - 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (low + w).to(torch.float32)

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        """The log-sigma table on `device` (float64 where the device has it), copied once."""
        cached = self._device_tables.get(device)
        if cached is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = self._device_tables[device] = self._log_sigmas.to(device, dtype)
        return cached

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a (fractional) timestep."""
        t = torch.as_tensor(t)
        tt = t.detach().to("cpu", torch.float64).clamp(0, len(self) - 1)
        low = tt.floor().long()
        high = tt.ceil().long()
        w = tt - low
        log_sigma = (1 - w) * self._log_sigmas[low] + w * self._log_sigmas[high]
        return log_sigma.exp().to(t.device, torch.float32)

    def get_sigmas(self, n: int) -> torch.Tensor:
        """k-diffusion's uniform schedule: n timesteps evenly from t_max to 0, then 0."""
        t = torch.linspace(len(self) - 1, 0, n, dtype=torch.float64)
        return _finish(self.t_to_sigma(t).double().tolist(), "cpu")


# ---- helpers ---------------------------------------------------------------


def check_steps(steps: int) -> None:
    """Raise InvalidParams unless steps is a positive integer."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidParams(f"Sampling steps must be a positive integer, got {steps!r}.")


def _check_range(context: ScheduleContext) -> tuple[float, float]:
    sigma_min, sigma_max = float(context.sigma_min), float(context.sigma_max)
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise InvalidParams(f"Invalid sigma range {sigma_min!r} .. {sigma_max!r}.")
    return sigma_min, sigma_max


def _finish(values, device) -> torch.Tensor:
    """Append the final 0 and return float32 on device."""
    sigmas = torch.tensor([*list(values), 0.0], dtype=torch.float64)
    return sigmas.to(device=device, dtype=torch.float32)


def _table(context: ScheduleContext) -> DiscreteSchedule:
    return DiscreteSchedule.from_sigmas(context.model_sigmas)


def _rho(context: ScheduleContext, default: float) -> float:
    return float(context.rho) if context.rho is not None else default


# ---- schedules -------------------------------------------------------------


def automatic(steps: int, context: ScheduleContext) -> torch.Tensor:
    """Placeholder: "Automatic" must be resolved to the sampler's default first."""
    raise InvalidParams(
        "The 'Automatic' schedule has no sigmas of its own; resolve it with resolve_scheduler() first."
    )


def uniform(steps: int, context: ScheduleContext) -> torch.Tensor:
    """k-diffusion `DiscreteSchedule.get_sigmas`: timesteps evenly from 999 to 0."""
    check_steps(steps)
    return _table(context).get_sigmas(steps).to(context.device)


def karras(steps: int, context: ScheduleContext) -> torch.Tensor:
    """Karras et al. 2022 (EDM), eq. 5: sigma^(1/rho) linear in the step index, rho = 7."""
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    rho = _rho(context, 7.0)
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((max_inv + ramp * (min_inv - max_inv)) ** rho, context.device)


def exponential(steps: int, context: ScheduleContext) -> torch.Tensor:
    """log-sigma linear from sigma_max to sigma_min."""
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)), context.device)


def polyexponential(steps: int, context: ScheduleContext) -> torch.Tensor:
    """k-diffusion polyexponential: log-sigma follows ramp^rho (rho = 1 is exponential)."""
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    ramp = np.linspace(1, 0, steps) ** _rho(context, 1.0)
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _finish(np.exp(ramp * (log_max - log_min) + log_min), context.device)


def sgm_uniform(steps: int, context: ScheduleContext) -> torch.Tensor:
    """SGM (SDXL reference code) uniform: steps+1 timesteps from t(sigma_max) to t(sigma_min), last dropped."""
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    table = _table(context)
    start, end = float(table.sigma_to_t(sigma_max)), float(table.sigma_to_t(sigma_min))
    t = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]
    return _finish(table.t_to_sigma(t).tolist(), context.device)


def normal(steps: int, context: ScheduleContext) -> torch.Tensor:
    """ComfyUI/A1111 "normal": steps timesteps evenly from t(sigma_max) to t(sigma_min)."""
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    table = _table(context)
    start, end = float(table.sigma_to_t(sigma_max)), float(table.sigma_to_t(sigma_min))
    t = torch.linspace(start, end, steps, dtype=torch.float64)
    return _finish(table.t_to_sigma(t).tolist(), context.device)


def simple(steps: int, context: ScheduleContext) -> torch.Tensor:
    """ComfyUI "simple": every (len/steps)-th table sigma, counting down from the top."""
    check_steps(steps)
    table = _table(context).sigmas
    stride = len(table) / steps
    if stride < 1:
        raise InvalidParams(f"The Simple schedule supports at most {len(table)} steps.")
    return _finish([float(table[-(1 + int(i * stride))]) for i in range(steps)], context.device)


def ddim(steps: int, context: ScheduleContext) -> torch.Tensor:
    """DDIM's uniform timesteps, as diffusers' DDIMScheduler "leading" with steps_offset=1.

    Timesteps are `i * (T // steps) + 1` for i < steps (901, 801, ..., 1 for 10 steps
    of a 1000-step model), then sigma 0. The final model call is at t=1 and the last
    step lands on the clean sample, which matches DDIMScheduler with
    set_alpha_to_one=True. A1111 builds the same list with a while loop, which adds an
    extra step when T is not divisible by steps; we always give exactly `steps`.
    """
    check_steps(steps)
    table = _table(context).sigmas
    stride = len(table) // steps
    if stride < 1 or (steps - 1) * stride + 1 >= len(table):
        raise InvalidParams(f"The DDIM schedule supports at most {len(table) - 1} steps.")
    timesteps = [i * stride + 1 for i in reversed(range(steps))]
    return _finish([float(table[t]) for t in timesteps], context.device)


def kl_optimal(steps: int, context: ScheduleContext) -> torch.Tensor:
    """KL-optimal schedule (Sabour et al. 2024, AYS appendix): arctan(sigma) linear in the step.

    A1111 computes steps+1 points ending at sigma_min and no 0; we follow ComfyUI:
    `steps` points from sigma_max to sigma_min, then 0, so the image ends clean.
    """
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    w = np.linspace(0, 1, steps)
    return _finish(np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)), context.device)


def loglinear_interp(values, num: int) -> np.ndarray:
    """Resample a descending sequence to `num` points, linearly in log space."""
    values = np.asarray(values, dtype=np.float64)
    xs = np.linspace(0, 1, len(values))
    return np.exp(np.interp(np.linspace(0, 1, num), xs, np.log(values[::-1])))[::-1].copy()


def align_your_steps(steps: int, context: ScheduleContext) -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): NVIDIA's 10-step tables for SD 1.5 or SDXL.

    As A1111: the 11-level table is log-linearly resampled to `steps` levels, then 0
    (so 11 steps use the table as published). The table ignores the context's sigma
    range. One step gives [sigma_max of the table, 0].
    """
    check_steps(steps)
    table = AYS_SDXL if context.arch == "sdxl" else AYS_SD15
    levels = [table[0]] if steps == 1 else loglinear_interp(table, steps)
    return _finish(levels, context.device)


def beta(steps: int, context: ScheduleContext) -> torch.Tensor:
    """Beta schedule (Lee et al. 2024, arXiv:2407.12173), alpha = beta = 0.6 as A1111.

    Sigma is linear in the Beta(0.6, 0.6) quantile of 1 - linspace(0, 1, steps).
    """
    check_steps(steps)
    sigma_min, sigma_max = _check_range(context)
    q = beta_ppf(1 - np.linspace(0, 1, steps), BETA_ALPHA, BETA_BETA)
    return _finish(sigma_min + q * (sigma_max - sigma_min), context.device)


# ---- the Beta distribution's quantile, without scipy -----------------------


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iters: int = 300) -> np.ndarray:
    """Continued fraction for the incomplete beta function (modified Lentz method)."""
    tiny = 1e-300
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, iters + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < 1e-15):
            break
    return h


def beta_cdf(x, a: float, b: float) -> np.ndarray:
    """Regularised incomplete beta function I_x(a, b)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    xs = np.where(inner, x, 0.5)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * np.log(xs) + b * np.log1p(-xs)
    swap = xs >= (a + 1) / (a + b + 2)  # use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    aa, bb = np.where(swap, b, a), np.where(swap, a, b)
    cf = _betacf(aa, bb, np.where(swap, 1 - xs, xs))
    value = np.exp(log_front) * cf / aa
    value = np.where(swap, 1 - value, value)
    return np.where(inner, value, np.where(x >= 1, 1.0, 0.0))


def beta_ppf(q, a: float, b: float) -> np.ndarray:
    """Quantile function of Beta(a, b), by bisection on the CDF (float64-exact)."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(64):
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))


# ---- resolution used by the pipeline ---------------------------------------


def resolve_scheduler(sampler: SamplerSpec, scheduler: SchedulerSpec, schedulers) -> SchedulerSpec:
    """Map "automatic" to the sampler's default schedule; other specs pass through.

    `schedulers` is the schedule registry (anything with `.get(name)`).
    """
    if scheduler.name != "automatic":
        return scheduler
    resolved = schedulers.get(sampler.default_scheduler or "uniform")
    if resolved.name == "automatic":
        resolved = schedulers.get("uniform")
    return resolved


def sigmas_for(sampler: SamplerSpec, scheduler: SchedulerSpec, steps: int, context: ScheduleContext) -> torch.Tensor:
    """`steps + 1` sigmas for this sampler: builds one more and drops the penultimate
    sigma when `sampler.discard_next_to_last_sigma` (DPM2 family, as A1111)."""
    check_steps(steps)
    if scheduler.name == "automatic":
        raise InvalidParams("Resolve the 'Automatic' schedule with resolve_scheduler() first.")
    if context.rho is None and scheduler.default_rho is not None:
        context = dataclasses.replace(context, rho=scheduler.default_rho)
    if not sampler.discard_next_to_last_sigma:
        return scheduler.function(steps, context)
    sigmas = scheduler.function(steps + 1, context)
    return torch.cat([sigmas[:-2], sigmas[-1:]])
