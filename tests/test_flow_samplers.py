"""Ancestral and SDE samplers on rectified-flow models (x = (1 - sigma) x0 + sigma noise), and the schedules.

1. With the exact denoiser of Gaussian data, each sampler's samples at every sigma have the flow marginal's mean
   and variance (the VE noise formula, `flow=False`, must not: the test can fail).
2. Against ComfyUI's formulas for CONST models, written here independently, on the same noise.
3. Karras, Beta, SGM Uniform, Normal and Simple give valid flow sigmas with the shift applied, and jobs run.
"""
from __future__ import annotations

import math

import pytest
import torch

from modules.pipeline.params import Txt2ImgParams
from modules.sampling import flow
from modules.sampling.samplers import sample_dpm_2_ancestral, sample_euler_ancestral
from modules.sampling.samplers_dpmpp import (
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from tests.conftest import make_engine
from tests.fixtures.make_tiny_mmdit import make_all_in_one

MEAN, STD = 0.6, 0.5  # the toy data: x0 ~ N(MEAN, STD^2), elementwise
SAMPLERS = {"Euler a": sample_euler_ancestral, "DPM2 a": sample_dpm_2_ancestral,
            "DPM++ 2S a": sample_dpmpp_2s_ancestral, "DPM++ SDE": sample_dpmpp_sde,
            "DPM++ 2M SDE": sample_dpmpp_2m_sde, "DPM++ 3M SDE": sample_dpmpp_3m_sde}


def gaussian_flow_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_sigma] for x_sigma = a x0 + sigma eps, a = 1 - sigma, x0 ~ N(MEAN, STD^2)."""
    s = sigma.reshape(-1, 1, 1, 1).double()
    a = 1 - s
    return MEAN + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MEAN)


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    return flow.shift_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def marginal_errors(sampler, use_flow: bool, steps: int = 100, floor: float = 0.1) -> float:
    """The worst standardised mean error and relative variance error of the samples at each sigma >= `floor`
    the sampler visits (below it, and in the final jump to sigma 0, the first-order samplers' discretisation
    error dominates; Euler a's is the largest)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 200, 200, dtype=torch.float64)
    worst = []

    def check(info):
        sigma = info["sigma"]
        a = 1 - sigma
        var = a**2 * STD**2 + sigma**2
        got = info["x"]
        if sigma >= floor:
            worst.append(max(abs(float(got.mean()) - a * MEAN) / math.sqrt(var), abs(float(got.var()) / var - 1)))

    sampler(gaussian_flow_denoiser, x, flow_sigmas(steps, shift=1.0), callback=check, flow=use_flow)
    return max(worst)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_flow_noise_keeps_the_rectified_flow_marginals(name: str) -> None:
    sampler = SAMPLERS[name]
    assert marginal_errors(sampler, use_flow=True) < (0.08 if name == "Euler a" else 0.03), name
    assert marginal_errors(sampler, use_flow=False) > 0.3, f"{name}: the VE formula should miss the marginals"


# ---- ComfyUI's formulas for CONST (rectified-flow) models, written out independently -------------------------

def _rf_split(s, sn, eta):
    down = sn * (1 + (sn / s - 1) * eta)
    a_next, a_down = 1 - sn, 1 - down
    return down, (sn**2 - down**2 * a_next**2 / a_down**2) ** 0.5, a_next / a_down


def comfy_euler_a_rf(model, x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, torch.tensor([s], dtype=torch.float64))
        if sn == 0:
            x = d
            continue
        down, up, ratio = _rf_split(s, sn, eta)
        x = (down / s) * x + (1 - down / s) * d
        x = ratio * x + noise() * up
    return x


def comfy_2s_a_rf(model, x, sigmas, noise, eta=1.0):
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    sig = lambda v: 1 / (math.exp(v) + 1)  # noqa: E731
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, torch.tensor([s], dtype=torch.float64))
        down, up, ratio = _rf_split(s, sn, eta)
        if sn == 0:
            x = x + (x - d) / s * (down - s)
        else:
            s_mid = sig(lam(s) + 0.5 * (lam(down) - lam(s)))
            u = (s_mid / s) * x + (1 - s_mid / s) * d
            d2 = model(u, torch.tensor([s_mid], dtype=torch.float64))
            x = (down / s) * x + (1 - down / s) * d2
        if sn > 0:
            x = ratio * x + noise() * up
    return x


def comfy_2m_sde_const(model, x, sigmas, noise, eta=1.0):
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, torch.tensor([s], dtype=torch.float64))
        if sn == 0:
            x = d
        else:
            h = lam(sn) - lam(s)
            h_eta = h * (eta + 1)
            alpha_t = sn * math.exp(lam(sn))
            x = sn / s * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * d
            if old is not None:
                x = x + 0.5 * alpha_t * -math.expm1(-h_eta) * (h / h_last) * (d - old)
            x = x + noise() * sn * math.sqrt(-math.expm1(-2 * h * eta))
            h_last = h
        old = d
    return x


def comfy_3m_sde_const(model, x, sigmas, noise, eta=1.0):
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, torch.tensor([s], dtype=torch.float64))
        if sn == 0:
            x = d
        else:
            h = lam(sn) - lam(s)
            h_eta = h * (eta + 1)
            alpha_t = sn * math.exp(lam(sn))
            x = math.exp(-h * eta) * (sn / s) * x + alpha_t * -math.expm1(-h_eta) * d
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + alpha_t * phi_2 * d1 - alpha_t * (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + alpha_t * phi_2 * (d - d_1) / (h_1 / h)
            x = x + noise() * sn * math.sqrt(-math.expm1(-2 * h * eta))
        d_1, d_2, h_1, h_2 = d, d_1, h if sn else h_1, h_1 if sn else h_2
    return x


def toy_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = float(sigma.reshape(-1)[0])
    return 0.8 * (1 - s) * x + 0.1 * torch.tanh(3 * x) + 0.05


@pytest.mark.parametrize("ours, theirs", [(sample_euler_ancestral, comfy_euler_a_rf),
                                          (sample_dpmpp_2s_ancestral, comfy_2s_a_rf),
                                          (sample_dpmpp_2m_sde, comfy_2m_sde_const),
                                          (sample_dpmpp_3m_sde, comfy_3m_sde_const)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_matches_comfyui_const_formulas(ours, theirs, eta: float) -> None:
    sigmas = flow_sigmas(8)[1:]  # from below 1: ComfyUI offsets a first sigma of 1 for the log-SNR samplers
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)]) if sigmas[-1] != 0 else sigmas
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    draws = torch.randn(40, 1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def stream():
        it = iter(draws)
        return lambda *args: next(it)

    mine = ours(toy_model, x, sigmas, noise_sampler=stream(), eta=eta, flow=True)
    theirs_out = theirs(toy_model, x, sigmas, stream(), eta=eta)
    torch.testing.assert_close(mine, theirs_out, rtol=1e-9, atol=1e-9)
    ve = ours(toy_model, x, sigmas, noise_sampler=stream(), eta=eta, flow=False)
    assert not torch.allclose(ve, theirs_out, atol=1e-3)


# ---- schedules on flow models ----------------------------------------------------------------------------------

SCHEDULES = ["Karras", "Beta", "SGM Uniform", "Normal", "Simple"]


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-schedules")
    engine = make_engine(root)
    engine.load_model(make_all_in_one("sd35-large", root / "models" / "Stable-diffusion" / "sd35.safetensors"))
    return engine


@pytest.mark.parametrize("scheduler", SCHEDULES)
def test_schedules_are_valid_flow_sigmas(sd35, scheduler: str) -> None:
    from modules.pipeline import sampling
    from modules.sampling.specs import ScheduleContext

    for shift in (1.0, 3.0):
        table = flow.flow_sigma_table(shift)
        context = ScheduleContext(sigma_min=float(table[0]), sigma_max=float(table[-1]), model_sigmas=table.float(),
                                  arch="sd35-large", flow=True)
        plan = sampling.plan_sampling(sd35.registries, "Euler", scheduler, 12, context, {})
        sig = plan.sigmas.double()
        assert sig[-1] == 0 and len(sig) == 13, scheduler
        body = sig[:-1]
        assert bool(((body > 0) & (body <= 1 + 1e-6)).all()), (scheduler, sig)
        assert bool((body[:-1] > body[1:]).all()), (scheduler, sig)  # strictly decreasing
        assert float(body[0]) == pytest.approx(1.0, abs=2e-3) or scheduler in ("Karras", "Beta")
        # the shift is applied: every sigma lies in the shifted table's range [shift(1/1000), 1]
        assert float(body.min()) >= float(table[0]) * (1 - 1e-4), (scheduler, shift)
        if shift == 3.0 and scheduler in ("Simple", "Normal", "SGM Uniform"):
            mid = float(body[len(body) // 2])
            assert mid > 0.6, f"{scheduler}: a shift of 3 keeps the middle sigma high, got {mid}"


@pytest.mark.parametrize("scheduler", SCHEDULES)
def test_a_job_runs_with_each_schedule(sd35, scheduler: str) -> None:
    result = sd35.txt2img(Txt2ImgParams(prompt="a fox", steps=3, width=64, height=64, seed=1, cfg_scale=4.0,
                                        sampler_name="DPM++ 2M SDE", scheduler=scheduler, save_images=False))
    text = result.infotexts[0]
    assert result.images[0].size == (64, 64) and f"Schedule type: {scheduler}" in text
    assert "Shift: 3" in text


def test_flow_job_passes_flow_to_the_sampler(sd35, monkeypatch) -> None:
    """The pipeline hands `flow=True` to samplers that take it, on FLUX.1 / SD3.5 jobs."""
    import modules.pipeline.job as job_module

    plans = []
    real = job_module.plan_sampling

    def spy(*args, **kw):
        plans.append(real(*args, **kw))
        return plans[-1]

    monkeypatch.setattr(job_module, "plan_sampling", spy)
    sd35.txt2img(Txt2ImgParams(prompt="a fox", steps=2, width=64, height=64, seed=1, sampler_name="Euler a",
                               save_images=False))
    assert plans and plans[-1].options.get("flow") is True
