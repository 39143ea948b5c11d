"""The samplers added after A1111's first fifteen, against k-diffusion (PyPI `k-diffusion`, loaded
by tests/kdiffusion_ref.py), diffusers and closed forms, in float64 on toy denoisers.

SDE samplers are compared with Brownian-tree noise: our `BrownianTreeNoise` against
k-diffusion's `BrownianTreeNoiseSampler` with the same per-image seeds, as A1111 seeds it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, TCDScheduler
from scipy import integrate

from modules.sampling import samplers_cfgpp as C
from modules.sampling import samplers_dpm_solver as F
from modules.sampling import samplers_dpmpp as P
from modules.sampling import samplers_extra as E
from modules.sampling import samplers_sa as SA
from modules.sampling.denoisers import CFGDenoiser, Cond
from modules.sampling.noise import BrownianTreeNoise
from tests.kdiffusion_ref import load_sampling

K = load_sampling()
W = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
B = torch.tensor([0.05, -0.1], dtype=torch.float64)
SEEDS = [11, 12, 13, 14]


def eps_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x @ W.T / (1 + sigma**2) ** 0.5 + B * (1 + 0.1 * sigma)


def denoiser(x, sigma_batch):
    sigma = float(sigma_batch.reshape(-1)[0])
    return x - sigma * eps_fn(x, sigma)


def karras(n=12, lo=0.03, hi=14.6) -> torch.Tensor:
    return torch.tensor([*E.karras_sigmas(n, lo, hi), 0.0], dtype=torch.float64)


def x_start(sigma: float, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma


@pytest.fixture(autouse=True)
def float64():
    """k-diffusion builds some tensors with the default dtype: make it f64 for both sides."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def replay(n: int = 200, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(n)]
    return lambda: (lambda queue: (lambda s, t: queue.pop(0)))(list(values))


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- Brownian-tree noise ------------------------------------------------------------


def test_brownian_tree_noise_is_k_diffusions():
    x = torch.zeros(4, 2)
    ours, ref = BrownianTreeNoise(x, 0.03, 14.6, SEEDS), K.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=SEEDS)
    for a, b in [(14.6, 9.0), (9.0, 2.5), (2.5, 0.03), (5.0, 1.0)]:
        close(ours(a, b), ref(torch.tensor(a), torch.tensor(b)))
    # a different seed gives a different path; each image has its own tree
    other = BrownianTreeNoise(x, 0.03, 14.6, [11, 99, 13, 14])(9.0, 2.5)
    assert torch.equal(other[0], ours(9.0, 2.5)[0]) and not torch.allclose(other[1], ours(9.0, 2.5)[1])


@pytest.mark.parametrize("name,ours,ref,kwargs", [
    ("DPM++ SDE", P.sample_dpmpp_sde, "sample_dpmpp_sde", {}),
    ("DPM++ 2M SDE", P.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {}),
    ("DPM++ 2M SDE Heun", P.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("DPM++ 3M SDE", P.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", {}),
])
def test_sde_samplers_with_brownian_noise_match_k_diffusion(name, ours, ref, kwargs):
    sigmas = karras()
    x = x_start(float(sigmas[0]))
    lo, hi = float(sigmas[-2]), float(sigmas[0])
    got = ours(denoiser, x, sigmas, noise_sampler=BrownianTreeNoise(x, lo, hi, SEEDS), **kwargs)
    want = getattr(K, ref)(denoiser, x, sigmas, noise_sampler=K.BrownianTreeNoiseSampler(x, lo, hi, seed=SEEDS),
                           disable=True, **kwargs)
    close(got, want)


# ---- DPM-Solver: DPM fast and DPM adaptive ------------------------------------------


@pytest.mark.parametrize("steps", [7, 9, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_matches_k_diffusion(steps, eta):
    sigmas = karras(steps)
    x = x_start(float(sigmas[0]))
    noise = replay()
    got = F.sample_dpm_fast(denoiser, x, sigmas, eta=eta, noise_sampler=noise())
    want = K.sample_dpm_fast(denoiser, x, float(sigmas[-2]), float(sigmas[0]), steps, eta=eta,
                             noise_sampler=noise(), disable=True)
    close(got, want)


@pytest.mark.parametrize("order,eta", [(3, 0.0), (2, 0.0), (3, 0.5)])
def test_dpm_adaptive_matches_k_diffusion(order, eta):
    sigmas = karras(10)
    x = x_start(float(sigmas[0]))
    noise = replay(2000)
    got = F.sample_dpm_adaptive(denoiser, x, sigmas, order=order, eta=eta, noise_sampler=noise())
    want = K.sample_dpm_adaptive(denoiser, x, float(sigmas[-2]), float(sigmas[0]), order=order, eta=eta,
                                 noise_sampler=noise(), disable=True)
    close(got, want)


# ---- Restart ------------------------------------------------------------------------


def test_restart_is_heun_with_restarts_as_a1111_plans_them():
    """20 steps: an 11-step Karras schedule, then 9 Heun steps from sigma ~2 back down to ~0.1."""
    sigmas = karras(20)
    x = x_start(float(sigmas[0]))
    noise = replay()
    got = E.sample_restart(denoiser, x, sigmas, noise_sampler=noise())
    base = K.get_sigmas_karras(11, float(sigmas[-2]), float(sigmas[0]))
    lo = int(torch.argmin((base - 0.1).abs()))
    hi = int(torch.argmin((base - 2.0).abs()))
    restart = K.get_sigmas_karras(10, float(base[lo]), float(base[hi]))[:-1]
    draws = noise()
    y = K.sample_heun(denoiser, x, torch.cat([base[:lo + 1], torch.zeros(1)])[:-1], disable=True)
    y = y + draws(0, 0) * math.sqrt(float(restart[0]) ** 2 - float(base[lo]) ** 2)
    y = K.sample_heun(denoiser, y, restart, disable=True)
    want = K.sample_heun(denoiser, y, base[lo:], disable=True)
    close(got, want)
    assert len(E.restart_steps(sigmas.tolist(), None)) == 20


def test_restart_below_20_steps_is_heun():
    sigmas = karras(12)
    x = x_start(float(sigmas[0]))
    close(E.sample_restart(denoiser, x, sigmas), K.sample_heun(denoiser, x, sigmas, disable=True))


# ---- multistep: DEIS, iPNDM, PLMS, Res Multistep -----------------------------------


def test_deis_is_third_order_adams_bashforth_in_sigma():
    sigmas = karras(12)[:-1]  # k-diffusion's LMS integrates to 0; DEIS ends with Euler
    x = x_start(float(sigmas[0]))
    close(E.sample_deis(denoiser, x, sigmas), K.sample_lms(denoiser, x, sigmas, order=3, disable=True), 1e-8)


def test_ipndm_equals_variable_step_adams_bashforth_on_uniform_steps():
    sigmas = torch.linspace(8.0, 0.5, 13, dtype=torch.float64)
    x = x_start(8.0)
    close(E.sample_ipndm(denoiser, x, sigmas), K.sample_lms(denoiser, x, sigmas, order=4, disable=True), 1e-8)


def test_plms_matches_diffusers_pndm():
    sched = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                          set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(10)
    acp = sched.alphas_cumprod.double()
    sigma_of = lambda t: float(((1 - acp[t]) / acp[t]) ** 0.5)  # noqa: E731
    unique = sorted({int(t) for t in sched.timesteps}, reverse=True)
    sigmas = torch.tensor([sigma_of(t) for t in unique] + [0.0])
    x = x_start(float(sigmas[0]))
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for t in sched.timesteps:
        sigma = sigma_of(int(t))
        sample = sched.step(eps_fn(sample * (1 + sigma**2) ** 0.5, sigma), t, sample).prev_sample
    close(E.sample_plms(denoiser, x, sigmas), sample, 2e-6)  # diffusers keeps alphas_cumprod in float32


def extrapolation_weights(t0: float, t1: float, tp: float) -> tuple[float, float]:
    """Integrals over [t0, t1] of e^(t - t1) times the line through (t0, 1), (tp, 0) and its complement."""
    now = integrate.quad(lambda t: math.exp(t - t1) * (1 + (t - t0) / (t0 - tp)), t0, t1)[0]
    old = integrate.quad(lambda t: math.exp(t - t1) * -(t - t0) / (t0 - tp), t0, t1)[0]
    return now, old


def test_res_multistep_is_the_exponential_integrator_of_the_linear_extrapolation():
    """Each step integrates x' = -(x - D(t)) in t = -log(sigma), D extrapolated linearly in t
    through the last two denoised values: weights computed here by quadrature."""
    sigmas = karras(10)
    x = x_start(float(sigmas[0]))
    sig = sigmas.tolist()
    y, old = x, None
    for i in range(len(sig) - 1):
        d = denoiser(y, torch.tensor([sig[i]]))
        if sig[i + 1] == 0 or old is None:
            y = d + (y - d) * sig[i + 1] / sig[i]
        else:
            t0, t1, tp = -math.log(sig[i]), -math.log(sig[i + 1]), -math.log(sig[i - 1])
            w_now, w_old = extrapolation_weights(t0, t1, tp)
            y = math.exp(t0 - t1) * y + w_now * d + w_old * old
        old = d
    close(E.sample_res_multistep(denoiser, x, sigmas), y, 1e-9)


@pytest.mark.parametrize("gamma", [0.3, 0.0, 1.0])
def test_tcd_matches_diffusers_tcd(gamma):
    sched = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(6)
    acp = sched.alphas_cumprod.double()
    table = ((1 - acp) / acp).sqrt()  # the model's sigma table, ascending
    sigmas = torch.tensor([float(table[int(t)]) for t in sched.timesteps] + [0.0])
    x = x_start(float(sigmas[0]))
    gen, draws = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for t in sched.timesteps:
        sigma = float(table[int(t)])
        sample = sched.step(eps_fn(sample * (1 + sigma**2) ** 0.5, sigma), t, sample, eta=gamma,
                            generator=gen).prev_sample
    noise = lambda s, t: torch.randn(4, 2, generator=draws, dtype=torch.float64)  # noqa: E731
    ours = E.sample_tcd(denoiser, x, sigmas, gamma=gamma, model_sigmas=table, noise_sampler=noise)
    close(ours / (1 + table[0] ** 2) ** 0.5, sample, 2e-6)  # ends at timestep 0's level; diffusers in VP scale


def er_sde_reference(x, sigmas, noise, max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2023, eq. 17 with alpha = 1) with its integrals by quadrature."""
    f = E.er_sde_noise_scaler
    sig = sigmas.tolist()
    old = old_d = None
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        d = denoiser(x, torch.tensor([s]))
        if t == 0:
            return d
        r = f(t) / f(s)
        x = r * x + (1 - r) * d
        if i >= 1 and max_stage >= 2:
            one = integrate.quad(lambda lam: 1 / f(lam), t, s)[0]
            d1 = (d - old) / (s - sig[i - 1])
            x = x + ((t - s) + f(t) * one) * d1
            if i >= 2 and max_stage >= 3:
                lin = integrate.quad(lambda lam, s=s: (lam - s) / f(lam), t, s)[0]
                x = x + ((t - s) ** 2 / 2 + f(t) * lin) * (d1 - old_d) / ((s - sig[i - 2]) / 2)
            old_d = d1
        x = x + noise(s, t) * math.sqrt(t**2 - s**2 * r**2)
        old = d
    return x


@pytest.mark.parametrize("max_stage,tol", [(1, 1e-12), (3, 2e-3)])
def test_er_sde_follows_its_taylor_expansion(max_stage, tol):
    """Stage 1 is closed form; stages 2-3 use 200-point Riemann sums of the paper's integrals (as the
    authors' code and ComfyUI), which agree with quadrature to about 0.1 %."""
    sigmas = karras(10)
    x = x_start(float(sigmas[0]))
    noise = replay()
    got = E.sample_er_sde(denoiser, x, sigmas, noise_sampler=noise(), max_stage=max_stage)
    want = er_sde_reference(x, sigmas, noise(), max_stage)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not torch.allclose(got, E.sample_er_sde(denoiser, x, sigmas, noise_sampler=noise(), s_noise=0.0))


@pytest.mark.parametrize("tau", [0.0, 1.0, 0.6])
def test_sa_solver_coefficients_integrate_the_interpolating_polynomial_exactly(tau):
    """sum_j b_j p(lambda_j) = (1 + tau^2) * integral of e^((1 + tau^2)(lambda - lambda_t)) p(lambda)
    for any polynomial p of degree < the number of nodes (here by scipy quadrature)."""
    nodes, lam_s, lam_t = [-2.1, -1.7, -1.2, -0.9], -0.9, -0.5
    for degree in range(4):
        coeffs = np.random.default_rng(degree).normal(size=degree + 1)
        poly = np.polynomial.Polynomial(coeffs)
        k = 1 + tau**2
        exact = integrate.quad(lambda lam, poly=poly, k=k: k * math.exp(k * (lam - lam_t)) * poly(lam), lam_s, lam_t)[0]
        got = sum(b * poly(node) for b, node in zip(SA.adams_coefficients(nodes, lam_s, lam_t, tau), nodes, strict=True))
        assert got == pytest.approx(exact, rel=1e-12, abs=1e-14)


def test_sa_solver_order_one_ode_step_is_dpm_solver_1():
    """One predictor step of order 1 with tau = 0 is DPM-Solver++(1): e^-h x + (1 - e^-h) D."""
    sigmas = torch.tensor([3.0, 1.2, 0.0])
    x = x_start(3.0)
    got = SA.sample_sa_solver(denoiser, x, sigmas[:2], eta=0.0, predictor_order=1, corrector_order=1)
    close(got, K.sample_euler(denoiser, x, sigmas[:2], disable=True))


def test_sa_solver_noise_only_inside_its_interval():
    table = torch.exp(torch.linspace(math.log(0.03), math.log(14.6), 1000))
    top, bottom = SA.percent_to_sigma(table, 0.2), SA.percent_to_sigma(table, 0.8)
    sigmas = karras(20)
    asked = []
    SA.sample_sa_solver(denoiser, x_start(14.6), sigmas, model_sigmas=table,
                        noise_sampler=lambda a, b: asked.append(b) or torch.zeros(4, 2))
    expected = [s for s in sigmas.tolist()[1:] if top >= s >= bottom]
    assert asked == expected and 0 < len(expected) < 20


# ---- CFG++ -------------------------------------------------------------------------


class GuidedToy:
    """CFG over two affine toy predictions; offers `last_uncond` as CFGDenoiser does."""

    def __init__(self, scale: float, shift: float = 0.3):
        self.scale, self.shift, self.last_uncond = scale, shift, None

    def __call__(self, x, sigma_batch):
        uncond = denoiser(x, sigma_batch)
        cond = uncond + self.shift * float(sigma_batch[0]) * torch.tensor([1.0, -0.5])
        self.last_uncond = uncond
        return uncond + self.scale * (cond - uncond)


def cfgpp_vp_reference(x, sigmas, scale_factor: float):
    """CFG++ (Chung et al. 2024, Algorithm 1) in VP form with eps predictions:
    x_prev = sqrt(a_prev) * x0(eps_guided) + sqrt(1 - a_prev) * eps_uncond."""
    model = GuidedToy(2.0)
    sig = sigmas.tolist()
    z = x / (1 + sig[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sig[:-1], sig[1:], strict=True):
        a, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        x_ve = z / a**0.5
        guided = model(x_ve, torch.tensor([sigma]))
        uncond = model.last_uncond
        guided = uncond + (guided - uncond) * scale_factor
        eps_g, eps_u = (x_ve - guided) / sigma, (x_ve - uncond) / sigma
        x0 = (z - (1 - a) ** 0.5 * eps_g) / a**0.5
        z = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps_u
    return z


@pytest.mark.parametrize("sampler,factor", [(C.sample_euler_cfg_pp, 1.0), (C.sample_ddim_cfg_pp, 1 / 12.5)])
def test_euler_and_ddim_cfg_pp_follow_the_paper(sampler, factor):
    sigmas = karras(10)
    x = x_start(float(sigmas[0]))
    close(sampler(GuidedToy(2.0), x, sigmas), cfgpp_vp_reference(x, sigmas, factor), 1e-9)


@pytest.mark.parametrize("ours,ref", [(C.sample_euler_cfg_pp, "sample_euler"), (C.sample_dpmpp_2m_cfg_pp, "sample_dpmpp_2m"),
                                      (C.sample_ddim_cfg_pp, "sample_euler")])
def test_cfg_pp_without_guidance_is_the_plain_sampler(ours, ref):
    sigmas = karras(10)
    x = x_start(float(sigmas[0]))
    close(ours(GuidedToy(3.0, shift=0.0), x, sigmas), getattr(K, ref)(denoiser, x, sigmas, disable=True))
    close(ours(denoiser, x, sigmas), getattr(K, ref)(denoiser, x, sigmas, disable=True))  # no last_uncond
    assert not torch.allclose(ours(GuidedToy(3.0), x, sigmas), ours(GuidedToy(3.0, shift=0.0), x, sigmas))


def test_cfg_denoiser_offers_the_last_uncond():
    """CFGDenoiser keeps each call's uncond row for CFG++ samplers; CFG scale 1 skips it."""
    def inner(x, sigma, cross_attn, pooled=None, concat=None):
        return x * cross_attn[:, 0, :1]  # a prediction that depends on the conditioning

    cond, uncond = Cond(torch.full((1, 1, 1), 2.0)), Cond(torch.full((1, 1, 1), 0.5))
    x = torch.ones(2, 1)
    for scale, expected in [(4.0, 0.5), (1.0, None)]:
        model = CFGDenoiser(inner, [[([(0, cond)], 1.0)]] * 2, [[(0, uncond)]] * 2, scale)
        out = model(x, torch.ones(2))
        if expected is None:
            assert model.last_uncond is None and torch.equal(out, 2 * x)
        else:
            assert torch.equal(model.last_uncond, expected * x) and torch.equal(out, (0.5 + 4 * 1.5) * x)
