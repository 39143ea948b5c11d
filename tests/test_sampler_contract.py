"""One contract suite over every registered sampler and schedule.

Convergence uses Gaussian data x0 ~ N(mu, diag(s^2)), whose optimal denoiser is
closed form, D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and whose
probability-flow ODE has the exact solution
x(sigma) = mu + (x_T - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""
from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

from modules.errors import InvalidParams
from modules.plugins.manager import build_plugin_manager, build_registries
from modules.plugins.specs import ScheduleContext
from modules.sampling import schedules as S

REGISTRIES = build_registries(build_plugin_manager())
SAMPLERS = list(REGISTRIES.samplers)
SCHEDULES = list(REGISTRIES.schedulers)
MU = torch.tensor([0.5, -1.0])
STD = torch.tensor([0.6, 1.4])

# A1111 v1.10 /sdapi/v1/samplers, in order, with aliases and the default schedule its
# options name ("uniform" where A1111 sets none; DDIM uses its own timesteps).
A1111_SAMPLERS = {
    "DPM++ 2M": (["k_dpmpp_2m"], "karras"),
    "DPM++ SDE": (["k_dpmpp_sde", "dpmpp_sde_gpu"], "karras"),
    "DPM++ 2M SDE": (["k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"], "exponential"),
    "DPM++ 2M SDE Heun": (["k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"], "exponential"),
    "DPM++ 2S a": (["k_dpmpp_2s_a"], "karras"),
    "DPM++ 3M SDE": (["k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"], "exponential"),
    "Euler a": (["k_euler_a", "k_euler_ancestral"], "uniform"),
    "Euler": (["k_euler"], "uniform"),
    "LMS": (["k_lms"], "uniform"),
    "Heun": (["k_heun"], "uniform"),
    "DPM2": (["k_dpm_2"], "karras"),
    "DPM2 a": (["k_dpm_2_a"], "karras"),
    "DPM fast": (["k_dpm_fast", "dpm_fast"], "uniform"),
    "DPM adaptive": (["k_dpm_ad", "dpm_adaptive"], "uniform"),
    "Restart": (["restart"], "karras"),
    "DDIM": (["ddim"], "ddim"),
    "DDIM CFG++": (["ddim_cfgpp"], "ddim"),
    "PLMS": (["plms"], "ddim"),  # A1111 runs PLMS on DDIM's timesteps
    "UniPC": (["unipc"], "uniform"),
    "LCM": (["k_lcm"], "uniform"),
    # ComfyUI / Forge extras (ComfyUI's names as aliases), after A1111's list
    "Euler CFG++": (["euler_cfg_pp", "k_euler_cfg_pp"], "uniform"),
    "DPM++ 2M CFG++": (["dpmpp_2m_cfg_pp", "k_dpmpp_2m_cfg_pp"], "karras"),
    "DEIS": (["deis"], "uniform"),
    "iPNDM": (["ipndm"], "uniform"),
    "Res Multistep": (["res_multistep"], "uniform"),
    "TCD": (["tcd"], "sgm_uniform"),
    "SA-Solver": (["sa_solver"], "uniform"),
    "ER-SDE": (["er_sde"], "uniform"),
}
A1111_SCHEDULERS = [
    ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"),
    ("beta", "Beta"),
]
A1111_SECOND_ORDER = {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"}
A1111_BROWNIAN = {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
# Samplers whose steps are not the schedule's: DPM-Solver picks its own levels between the
# schedule's ends (fast: about steps / 3 solver steps; adaptive: as many as its tolerance needs).
OWN_STEPS = {"DPM fast", "DPM adaptive"}
EXTRA_MODEL_CALLS = {"PLMS": 1}  # PLMS's first step is a pseudo improved Euler step
A1111_DISCARD = {"DPM2", "DPM2 a", "DPM++ 3M SDE"}


def sd1_context() -> ScheduleContext:
    table = S.DiscreteSchedule(S.scaled_linear_alphas_cumprod())
    return ScheduleContext(table.sigma_min, table.sigma_max, table.sigmas)


CTX = sd1_context()


def gaussian_denoiser(calls: list | None = None):
    def model(x, sigma):
        assert sigma.shape == (x.shape[0],)
        if calls is not None:
            calls.append(float(sigma[0]))
        sig = sigma.view(-1, *([1] * (x.ndim - 1)))
        mu, std = (v.view(2, *([1] * (x.ndim - 2))) for v in (MU, STD))  # per channel
        return (std**2 * x + sig**2 * mu) / (std**2 + sig**2)
    return model


def seeded_noise(shape, seed: int, counter: list | None = None):
    gen = torch.Generator().manual_seed(seed)

    def noise_sampler(sigma, sigma_next):
        if counter is not None:
            counter.append((sigma, sigma_next))
        return torch.randn(shape, generator=gen)
    return noise_sampler


def sigmas_for(spec, schedule_name: str, steps: int) -> torch.Tensor:
    schedule = S.resolve_scheduler(spec, REGISTRIES.schedulers.get(schedule_name), REGISTRIES.schedulers)
    return S.sigmas_for(spec, schedule, steps, CTX)


def start(n: int, sigma_max: float, seed: int = 0) -> torch.Tensor:
    """Exact samples of the noised data at sigma_max."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return MU + noise * (STD**2 + sigma_max**2).sqrt()


def run(spec, x, sigmas, seed=1, noise_counter=None, model_calls=None, callback=None, **overrides):
    options = {**spec.options, **overrides}
    if "model_sigmas" in inspect.signature(spec.function).parameters:  # as the pipeline does (TCD)
        options.setdefault("model_sigmas", CTX.model_sigmas)
    return spec.function(gaussian_denoiser(model_calls), x, sigmas, callback=callback,
                         noise_sampler=seeded_noise(x.shape, seed, noise_counter), **options)


def deterministic(spec) -> bool:
    return not spec.uses_noise


# ---- names and flags -------------------------------------------------------


def test_sampler_names_aliases_and_order_follow_a1111():
    names = [s.name for s in SAMPLERS]
    assert set(names) <= set(A1111_SAMPLERS), set(names) - set(A1111_SAMPLERS)
    assert names == [n for n in A1111_SAMPLERS if n in names]  # same relative order
    for spec in SAMPLERS:
        aliases, default = A1111_SAMPLERS[spec.name]
        assert list(spec.aliases) == aliases
        assert spec.default_scheduler == default, spec.name
        assert spec.second_order == (spec.name in A1111_SECOND_ORDER), spec.name
        assert spec.discard_next_to_last_sigma == (spec.name in A1111_DISCARD), spec.name
        assert spec.brownian_noise == (spec.name in A1111_BROWNIAN), spec.name
        assert REGISTRIES.samplers.get(aliases[0]) is spec


def test_scheduler_names_and_labels_follow_a1111():
    assert [(s.name, s.label) for s in SCHEDULES] == A1111_SCHEDULERS
    assert REGISTRIES.schedulers.names() == [label for _, label in A1111_SCHEDULERS]


def test_option_defaults():
    for spec in SAMPLERS:
        if "eta" in spec.options:
            assert spec.options["eta"] == (0.0 if spec.name.startswith("DDIM") else 1.0), spec.name
        if "s_noise" in spec.options:
            assert spec.options["s_noise"] == 1.0
    for name in ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        assert REGISTRIES.samplers.get(name).uses_noise


# ---- the contract, over every sampler x every schedule ---------------------


@pytest.mark.parametrize("schedule", [s.name for s in SCHEDULES])
@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_contract(spec, schedule):
    steps = 8
    sigmas = sigmas_for(spec, schedule, steps)
    assert sigmas.shape == (steps + 1,)
    x = start(32, float(sigmas[0])).reshape(32, 2, 1, 1)  # image-shaped batch
    seen, noise_calls, model_calls = [], [], []
    out = run(spec, x.clone(), sigmas, noise_counter=noise_calls, model_calls=model_calls, callback=seen.append)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    for d in seen:
        assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d)
        assert d["denoised"].shape == x.shape
    if spec.name in OWN_STEPS:
        assert [d["i"] for d in seen] == list(range(len(seen))) and seen
        assert seen[0]["sigma"] <= float(sigmas[0]) * (1 + 1e-6)
        assert all(a["sigma"] >= b["sigma"] >= float(sigmas[-2]) * (1 - 1e-6) for a, b in itertools.pairwise(seen))
    else:
        assert [d["i"] for d in seen] == list(range(steps))
        assert [d["sigma"] for d in seen] == pytest.approx(sigmas[:-1].tolist())
    again = run(spec, x.clone(), sigmas)
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # determinism with a seeded noise_sampler
    # Restart only restarts (draws noise) from 20 steps on
    assert bool(noise_calls) == (spec.uses_noise and spec.name != "Restart"), "uses_noise: is noise drawn?"
    if spec.second_order:
        assert steps < len(model_calls) <= 2 * steps
    elif spec.name == "DPM adaptive":
        assert len(model_calls) % 3 == 0 and model_calls
    else:
        assert len(model_calls) == steps + EXTRA_MODEL_CALLS.get(spec.name, 0)


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_rejects_bad_sigmas(spec):
    x = torch.zeros(2, 2)
    with pytest.raises(InvalidParams):
        spec.function(gaussian_denoiser(), x, torch.tensor([1.0]))
    with pytest.raises(InvalidParams):
        spec.function(gaussian_denoiser(), x, torch.tensor([1.0, 2.0, 0.0]))


def test_different_noise_seeds_give_different_results():
    for spec in SAMPLERS:
        if spec.uses_noise:
            sigmas = sigmas_for(spec, "automatic", 24 if spec.name == "Restart" else 10)
            x = start(16, float(sigmas[0]))
            assert not torch.allclose(run(spec, x, sigmas, seed=1), run(spec, x, sigmas, seed=2)), spec.name


# ---- convergence on Gaussian data -----------------------------------------


def consistency_variance(sigmas: list[float], jumps: list[float] | None = None) -> torch.Tensor:
    """Exact output variance of LCM / TCD sampling with the optimal (mean) denoiser: each step moves
    x to D + s (x - D) / sigma (s = jumps[i]; LCM: 0), scaling x - mu by (std^2 + sigma s) / (std^2 + sigma^2),
    then adds noise up to sigma_next."""
    jumps = jumps or [0.0] * (len(sigmas) - 1)
    var = STD.double() ** 2 + sigmas[0] ** 2
    for sigma, sigma_next, s in zip(sigmas[:-1], sigmas[1:], jumps, strict=True):
        gain = (STD.double() ** 2 + sigma * s) / (STD.double() ** 2 + sigma**2)
        var = gain**2 * var + max(sigma_next**2 - s**2, 0.0)
    return var


def tcd_jumps(sigmas: list[float], gamma: float = 0.3) -> list[float]:
    """TCD's intermediate levels: the table sigma at timestep floor((1 - gamma) * t(sigma_next))."""
    table = CTX.model_sigmas.double()
    t = [int(torch.argmin((table - s).abs())) if s > 0 else 0 for s in sigmas[1:]]
    return [min(float(table[math.floor((1 - gamma) * k)]), s or math.inf) for k, s in zip(t, sigmas[1:], strict=True)]


@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential"])
@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_samples_match_the_data_distribution(spec, schedule):
    sigmas = sigmas_for(spec, schedule, 100)
    out = run(spec, start(4096, float(sigmas[0])), sigmas)
    target_std = STD
    if spec.name in ("LCM", "TCD"):
        jumps = tcd_jumps(sigmas.tolist()) if spec.name == "TCD" else None
        target_std = consistency_variance(sigmas.tolist(), jumps).sqrt().float()
    assert (out.mean(0) - MU).abs().max() < 0.08, out.mean(0)
    assert ((out.std(0) / target_std) - 1).abs().max() < 0.06, out.std(0)


INTEGRATES_TO_ZERO = {"LMS"}


def ode_error(spec, steps: int, schedule: str = "karras", **overrides) -> float:
    sigmas = sigmas_for(spec, schedule, steps)
    x = start(16, float(sigmas[0]), seed=3)
    # the last step returns D(x; sigma_last), so compare with D of the exact ODE state there;
    # LMS instead integrates its polynomial down to sigma = 0
    sigma_last = 0.0 if spec.name in INTEGRATES_TO_ZERO else float(sigmas[-2])
    exact = MU + (x - MU) * STD**2 / ((STD**2 + sigmas[0] ** 2) * (STD**2 + sigma_last**2)).sqrt()
    if spec.name in OWN_STEPS:  # DPM-Solver stops on the ODE at sigma_min, without a last denoise
        exact = MU + (x - MU) * ((STD**2 + sigma_last**2) / (STD**2 + sigmas[0] ** 2)).sqrt()
    return float((run(spec, x, sigmas, **overrides) - exact).abs().max())


DETERMINISTIC = [s for s in SAMPLERS if deterministic(s)]
ETA_SAMPLERS = [s for s in SAMPLERS if "eta" in s.options and s.uses_noise]


# Convergence order on the ODE (with eta = 0 for the noisy ones); 4x the steps must cut the
# error by at least this factor (ideal: 4, 16, 64).
FIRST_ORDER = {"Euler", "Euler a", "DDIM", "Euler CFG++", "DDIM CFG++"}
THIRD_ORDER = {"LMS", "UniPC", "DPM fast", "DEIS", "SA-Solver"}  # PLMS, iPNDM: fixed-step weights, ~2nd order on Karras steps
MIN_ERROR_RATIO = {1: 3.0, 2: 10.0, 3: 40.0}


def check_ode_convergence(spec, **overrides) -> None:
    order = 1 if spec.name in FIRST_ORDER else 3 if spec.name in THIRD_ORDER else 2
    assert ode_error(spec, 30, **overrides) < 0.2
    if spec.name == "DPM adaptive":  # its error follows its tolerance, not the step count
        assert ode_error(spec, 30, rtol=1e-3, atol=1e-4, **overrides) < ode_error(spec, 30, **overrides) / 4
        return
    ratio = ode_error(spec, 15, **overrides) / ode_error(spec, 60, **overrides)
    assert ratio > MIN_ERROR_RATIO[order], ratio


@pytest.mark.parametrize("spec", DETERMINISTIC, ids=lambda s: s.name)
def test_deterministic_samplers_follow_the_exact_ode(spec):
    check_ode_convergence(spec)


@pytest.mark.parametrize("spec", ETA_SAMPLERS, ids=lambda s: s.name)
def test_eta_zero_makes_noisy_samplers_deterministic_ode_solvers(spec):
    counter: list = []
    sigmas = sigmas_for(spec, "karras", 12)
    run(spec, start(4, float(sigmas[0])), sigmas, noise_counter=counter, eta=0.0)
    assert not counter
    check_ode_convergence(spec, eta=0.0)


def test_higher_order_samplers_converge_faster_than_euler():
    euler = ode_error(REGISTRIES.samplers.get("Euler"), 20, "exponential")
    for name in ("Heun", "DPM2", "LMS", "DPM++ 2M", "UniPC"):
        assert ode_error(REGISTRIES.samplers.get(name), 20, "exponential") < euler / 4, name


def test_eta_zero_equivalences():
    """Known identities: DDIM(eta=0) = Euler, Euler a(eta=0) = Euler, 2M SDE(eta=0) = 2M."""
    get = REGISTRIES.samplers.get
    sigmas = S.karras(12, CTX)
    x = start(64, float(sigmas[0]))
    euler = run(get("Euler"), x, sigmas)
    torch.testing.assert_close(run(get("DDIM"), x, sigmas), euler, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(get("Euler a"), x, sigmas, eta=0.0), euler, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(get("DPM++ 2M SDE"), x, sigmas, eta=0.0), run(get("DPM++ 2M"), x, sigmas),
                               rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_equals_ancestral_euler():
    """DDIM's sigma_t, rescaled by 1/sqrt(alpha_prev), is k-diffusion's sigma_up."""
    get = REGISTRIES.samplers.get
    sigmas = S.ddim(10, CTX)
    x = start(64, float(sigmas[0]))
    torch.testing.assert_close(run(get("DDIM"), x, sigmas, eta=0.7), run(get("Euler a"), x, sigmas, eta=0.7),
                               rtol=1e-5, atol=1e-5)


def test_churn_adds_noise_and_still_converges():
    spec = REGISTRIES.samplers.get("Heun")  # Karras et al. 2022, Algorithm 2
    sigmas = S.karras(100, CTX)
    counter: list = []
    out = run(spec, start(4096, float(sigmas[0])), sigmas, noise_counter=counter, s_churn=20.0, s_tmin=0.05, s_tmax=10.0)
    assert counter and all(0.05 <= a <= 10.0 and b > a for a, b in counter)
    assert ((out.std(0) / STD) - 1).abs().max() < 0.06
    assert math.isfinite(float(out.sum()))
