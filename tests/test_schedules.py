"""Noise schedules against closed forms, diffusers' schedulers and published constants."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from modules.errors import InvalidParams
from modules.plugins.manager import build_plugin_manager, build_registries
from modules.plugins.specs import ScheduleContext
from modules.sampling import schedules as S

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def registries():
    return build_registries(build_plugin_manager())


@pytest.fixture(scope="module")
def table() -> S.DiscreteSchedule:
    return S.DiscreteSchedule(S.scaled_linear_alphas_cumprod())


@pytest.fixture(scope="module")
def ctx(table) -> ScheduleContext:
    return ScheduleContext(table.sigma_min, table.sigma_max, table.sigmas)


def np_table_sigmas() -> np.ndarray:
    """SD 1.x sigmas computed independently, in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    return np.sqrt((1 - ac) / ac)


def diffusers_sigmas(steps: int, **config) -> np.ndarray:
    sched = EulerDiscreteScheduler(**SD_BETAS, **config)
    sched.set_timesteps(steps)
    return sched.sigmas.numpy()


def test_sd1_sigma_range(table):
    assert table.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert table.sigma_max == pytest.approx(14.6146, abs=1e-3)
    assert len(table) == 1000
    np.testing.assert_allclose(table.sigmas.numpy(), np_table_sigmas(), rtol=2e-5)


def test_discrete_schedule_conversions(table):
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    np.testing.assert_allclose(table.t_to_sigma(t).numpy(), table.sigmas[t.long()].numpy(), rtol=1e-6)
    np.testing.assert_allclose(table.sigma_to_t(table.sigmas[[3, 500, 998]]).numpy(), [3, 500, 998], atol=1e-3)
    frac = torch.tensor([0.5, 123.25, 998.9])
    np.testing.assert_allclose(table.sigma_to_t(table.t_to_sigma(frac)).numpy(), frac.numpy(), atol=1e-3)
    # log-sigma interpolation, checked by hand at t = 123.25
    log_s = np.log(np_table_sigmas())
    expected = math.exp(0.75 * log_s[123] + 0.25 * log_s[124])
    assert float(table.t_to_sigma(123.25)) == pytest.approx(expected, rel=1e-5)
    # out-of-range sigmas clamp to the ends
    assert float(table.sigma_to_t(100.0)) == pytest.approx(999)
    assert float(table.sigma_to_t(1e-4)) == pytest.approx(0)


def test_discrete_schedule_rejects_bad_tables():
    with pytest.raises(InvalidParams):
        S.DiscreteSchedule.from_sigmas(torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_karras_closed_form_and_diffusers(ctx, steps):
    got = S.karras(steps, ctx).numpy()
    ramp = np.linspace(0, 1, steps)
    lo, hi = ctx.sigma_min ** (1 / 7), ctx.sigma_max ** (1 / 7)
    np.testing.assert_allclose(got[:-1], (hi + ramp * (lo - hi)) ** 7, rtol=1e-6)
    if steps > 1:
        np.testing.assert_allclose(got, diffusers_sigmas(steps, use_karras_sigmas=True), rtol=1e-5, atol=1e-6)


def test_karras_rho_override(ctx):
    got = S.karras(5, replace(ctx, rho=3.0)).numpy()
    ramp = np.linspace(0, 1, 5)
    lo, hi = ctx.sigma_min ** (1 / 3), ctx.sigma_max ** (1 / 3)
    np.testing.assert_allclose(got[:-1], (hi + ramp * (lo - hi)) ** 3, rtol=1e-6)


@pytest.mark.parametrize("steps", [2, 10, 25])
def test_exponential_and_polyexponential(ctx, steps):
    expo = S.exponential(steps, ctx).numpy()
    geometric = ctx.sigma_max * (ctx.sigma_min / ctx.sigma_max) ** (np.arange(steps) / (steps - 1))
    np.testing.assert_allclose(expo[:-1], geometric, rtol=1e-5)
    np.testing.assert_allclose(expo, diffusers_sigmas(steps, use_exponential_sigmas=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(S.polyexponential(steps, ctx).numpy(), expo, rtol=1e-6)  # rho = 1
    poly2 = S.polyexponential(steps, replace(ctx, rho=2.0)).numpy()
    ramp = np.linspace(1, 0, steps) ** 2
    expected = np.exp(np.log(ctx.sigma_min) + ramp * np.log(ctx.sigma_max / ctx.sigma_min))
    np.testing.assert_allclose(poly2[:-1], expected, rtol=1e-5)


@pytest.mark.parametrize("steps", [4, 10])  # t = linspace(999, 0, n) is integer here
def test_uniform_matches_diffusers_linspace(ctx, steps):
    got = S.uniform(steps, ctx).numpy()
    np.testing.assert_allclose(got, diffusers_sigmas(steps, timestep_spacing="linspace"), rtol=1e-5)
    np.testing.assert_allclose(S.normal(steps, ctx).numpy(), got, rtol=1e-5)


def test_sgm_uniform_simple_and_kl_optimal_closed_forms(ctx):
    log_s = np.log(np_table_sigmas())
    t = np.linspace(999, 0, 11)[:-1]
    np.testing.assert_allclose(S.sgm_uniform(10, ctx).numpy()[:-1], np.exp(np.interp(t, np.arange(1000), log_s)),
                               rtol=1e-4)
    np.testing.assert_allclose(S.simple(8, ctx).numpy()[:-1], np_table_sigmas()[[999, 874, 749, 624, 499, 374, 249, 124]],
                               rtol=2e-5)
    w = np.linspace(0, 1, 6)
    kl = np.tan(w * np.arctan(ctx.sigma_min) + (1 - w) * np.arctan(ctx.sigma_max))
    np.testing.assert_allclose(S.kl_optimal(6, ctx).numpy()[:-1], kl, rtol=1e-5)


@pytest.mark.parametrize("steps", [10, 20, 30])
def test_ddim_schedule_matches_diffusers_leading_timesteps(ctx, steps):
    sched = DDIMScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    t = sched.timesteps.numpy()
    assert t[-1] == 1 and len(t) == steps
    got = S.ddim(steps, ctx).numpy()
    np.testing.assert_allclose(got[:-1], np_table_sigmas()[t], rtol=2e-5)
    if steps == 10:
        assert list(t) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_beta_schedule_matches_scipy_and_diffusers(ctx):
    from scipy import stats

    q = np.linspace(0, 1, 41)
    np.testing.assert_allclose(S.beta_ppf(q, 0.6, 0.6), stats.beta.ppf(q, 0.6, 0.6), atol=1e-12)
    np.testing.assert_allclose(S.beta_ppf(q, 2.0, 0.5), stats.beta.ppf(q, 2.0, 0.5), atol=1e-10)
    np.testing.assert_allclose(S.beta(12, ctx).numpy(), diffusers_sigmas(12, use_beta_sigmas=True), rtol=1e-5, atol=1e-6)


NVIDIA_SD15 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
               0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
NVIDIA_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
               0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]


def test_align_your_steps_tables(ctx):
    np.testing.assert_allclose(S.AYS_SD15, NVIDIA_SD15, rtol=6e-3)
    np.testing.assert_allclose(S.AYS_SDXL, NVIDIA_SDXL, rtol=1.5e-2)
    np.testing.assert_allclose(S.align_your_steps(11, ctx).numpy(), [*S.AYS_SD15, 0.0], rtol=1e-6)
    xl = replace(ctx, arch="sdxl")
    np.testing.assert_allclose(S.align_your_steps(11, xl).numpy(), [*S.AYS_SDXL, 0.0], rtol=1e-6)
    # 21 levels: every other one is a table entry, the ones between are geometric means
    got = S.align_your_steps(21, ctx).numpy()[:-1]
    np.testing.assert_allclose(got[::2], S.AYS_SD15, rtol=1e-6)
    np.testing.assert_allclose(got[1::2], np.sqrt(np.array(S.AYS_SD15[:-1]) * np.array(S.AYS_SD15[1:])), rtol=1e-5)


def schedule_specs():
    return [s for s in build_registries(build_plugin_manager()).schedulers if s.name != "automatic"]


@pytest.mark.parametrize("spec", schedule_specs(), ids=lambda s: s.name)
@pytest.mark.parametrize("steps", [1, 2, 7, 30, 150])
def test_every_schedule_shape_and_order(spec, steps, ctx):
    sigmas = spec.function(steps, ctx)
    assert sigmas.shape == (steps + 1,)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1] == 0
    assert torch.isfinite(sigmas).all()
    assert (sigmas[:-1] > 0).all()
    assert (sigmas[1:] < sigmas[:-1]).all(), sigmas
    assert float(sigmas[0]) <= ctx.sigma_max * 1.001


@pytest.mark.parametrize("spec", schedule_specs(), ids=lambda s: s.name)
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_bad_step_counts_raise(spec, steps, ctx):
    with pytest.raises(InvalidParams):
        spec.function(steps, ctx)


def test_too_many_steps_for_table_schedules(ctx):
    with pytest.raises(InvalidParams):
        S.ddim(1000, ctx)
    with pytest.raises(InvalidParams):
        S.simple(1001, ctx)
    assert S.ddim(999, ctx)[-2] == pytest.approx(float(ctx.model_sigmas[1]))


def test_bad_sigma_range_raises(ctx):
    bad = replace(ctx, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(InvalidParams):
        S.karras(10, bad)


def test_automatic_resolves_to_the_sampler_default(registries, ctx):
    schedulers, samplers = registries.schedulers, registries.samplers
    auto = schedulers.get("Automatic")
    with pytest.raises(InvalidParams):
        auto.function(10, ctx)
    assert S.resolve_scheduler(samplers.get("DPM++ 2M"), auto, schedulers).name == "karras"
    assert S.resolve_scheduler(samplers.get("Euler a"), auto, schedulers).name == "uniform"
    assert S.resolve_scheduler(samplers.get("DDIM"), auto, schedulers).name == "ddim"
    assert S.resolve_scheduler(samplers.get("Euler"), schedulers.get("karras"), schedulers).name == "karras"
    assert schedulers.get("SGMUniform").name == "sgm_uniform"


def test_discard_next_to_last_sigma(registries, ctx):
    dpm2, karras = registries.samplers.get("DPM2"), registries.schedulers.get("karras")
    got = S.sigmas_for(dpm2, karras, 10, ctx)
    full = S.karras(11, ctx)
    assert got.shape == (11,)
    torch.testing.assert_close(got, torch.cat([full[:-2], full[-1:]]))
    euler = registries.samplers.get("Euler")
    torch.testing.assert_close(S.sigmas_for(euler, karras, 10, ctx), S.karras(10, ctx))
