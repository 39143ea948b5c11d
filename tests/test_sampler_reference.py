"""Sampler step math against diffusers' schedulers and scipy, on a toy eps model.

diffusers works in the variance-preserving scale x_vp = x / sqrt(1 + sigma^2) (except Euler
and LMS, which use k-diffusion's scale); the toy model predicts eps from (x, sigma), so
both sides see the same function and must agree to float32 precision.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from modules.plugins.specs import ScheduleContext
from modules.sampling import samplers as K
from modules.sampling import schedules as S
from modules.sampling.samplers_dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from modules.sampling.samplers_unipc import sample_unipc

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
W = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
B = torch.tensor([0.05, -0.1], dtype=torch.float64)


def eps_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A fixed function of (x, sigma): linear in x, smooth in sigma."""
    return x @ W.T / (1 + sigma**2) ** 0.5 + B * (1 + 0.1 * sigma)


def denoiser(x, sigma_batch):
    sigma = float(sigma_batch[0])
    return x - sigma * eps_fn(x, sigma)


def x_start(sigma_max: float) -> torch.Tensor:
    return torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max


def noises(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(n)]


def replay(values: list[torch.Tensor]):
    queue = list(values)
    return lambda sigma, sigma_next: queue.pop(0)


def run_vp_scheduler(sched, x_ve: torch.Tensor, **step_kwargs_per_step) -> torch.Tensor:
    """Run a VP-space diffusers multistep scheduler with eps_fn; returns x at sigma = 0."""
    sigmas = sched.sigmas.double()
    sample = x_ve / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(sched.timesteps):
        sigma = float(sigmas[i])
        eps = eps_fn(sample * (1 + sigma**2) ** 0.5, sigma)
        extra = {k: v[i] for k, v in step_kwargs_per_step.items()}
        sample = sched.step(eps, t, sample, **extra).prev_sample
    return sample


def test_euler_matches_diffusers_euler_discrete():
    sched = EulerDiscreteScheduler(**SD_BETAS)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double()
    x = x_start(float(sigmas[0]))
    sample = x.clone()
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(eps_fn(sample, float(sigmas[i])), t, sample).prev_sample
    torch.testing.assert_close(K.sample_euler(denoiser, x, sigmas), sample, rtol=1e-6, atol=1e-6)


def test_lms_matches_diffusers_lms_discrete():
    sched = LMSDiscreteScheduler(**SD_BETAS)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double()
    x = x_start(float(sigmas[0]))
    sample = x.clone()
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(eps_fn(sample, float(sigmas[i])), t, sample, order=4).prev_sample
    torch.testing.assert_close(K.sample_lms(denoiser, x, sigmas), sample, rtol=1e-4, atol=1e-4)


def test_lms_coefficients_match_numerical_quadrature():
    from scipy import integrate

    sigmas = [14.6, 9.1, 5.5, 3.2, 1.7, 0.9, 0.0]
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        for j, got in enumerate(K.lms_coefficients(sigmas, i, order)):
            def basis(tau, j=j, order=order, i=i):
                others = [k for k in range(order) if k != j]
                return np.prod([(tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in others])
            assert got == pytest.approx(integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=1e-12)[0], abs=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_matches_diffusers_ddim(eta):
    sched = DDIMScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading", set_alpha_to_one=True,
                          clip_sample=False)
    sched.set_timesteps(10)
    table = S.DiscreteSchedule(sched.alphas_cumprod)
    ctx = ScheduleContext(table.sigma_min, table.sigma_max, table.sigmas)
    sigmas = S.ddim(10, ctx).double()
    ac = sched.alphas_cumprod.double()
    np.testing.assert_allclose(sigmas[:-1].numpy(), ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt().numpy(),
                               rtol=1e-6)
    x = x_start(float(sigmas[0]))
    z = noises(10)
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(sched.timesteps):
        sigma = float(sigmas[i])
        eps = eps_fn(sample * (1 + sigma**2) ** 0.5, sigma)
        sample = sched.step(eps, t, sample, eta=eta, variance_noise=z[i]).prev_sample
    ours = K.sample_ddim(denoiser, x, sigmas, eta=eta, noise_sampler=replay(z))
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_matches_diffusers_dpmsolver_multistep():
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(12)
    x = x_start(float(sched.sigmas[0]))
    expected = run_vp_scheduler(sched, x)
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, x, sched.sigmas.double()), expected, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_sde_matches_diffusers_sde_dpmsolver():
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(12)
    x = x_start(float(sched.sigmas[0]))
    z = noises(12)
    expected = run_vp_scheduler(sched, x, variance_noise=z)
    ours = sample_dpmpp_2m_sde(denoiser, x, sched.sigmas.double(), eta=1.0, noise_sampler=replay(z))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def unipc_scheduler(order: int, variant: str) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(**SD_BETAS, solver_order=order, solver_type=variant, use_karras_sigmas=True,
                                    final_sigmas_type="zero")
    sched.set_timesteps(12)
    return sched


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2_matches_diffusers_unipc(order):
    sched = unipc_scheduler(order, "bh2")
    x = x_start(float(sched.sigmas[0]))
    expected = run_vp_scheduler(sched, x)
    ours = sample_unipc(denoiser, x, sched.sigmas.double(), order=order, variant="bh2")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_corrected_states_match_diffusers(order, variant):
    """Compare the corrected x at every step but the last: diffusers' bh1 turns the final
    step to sigma = 0 into NaN (B(h) = -inf times 0), ours returns the denoised estimate."""
    sched = unipc_scheduler(order, variant)
    sigmas = sched.sigmas.double()
    x = x_start(float(sigmas[0]))
    states: list[torch.Tensor] = []
    final = sample_unipc(denoiser, x, sigmas, order=order, variant=variant,
                         callback=lambda d: states.append(d["x"]))
    assert torch.isfinite(final).all()
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(sched.timesteps[:-1]):
        sigma = float(sigmas[i])
        sample = sched.step(eps_fn(sample * (1 + sigma**2) ** 0.5, sigma), t, sample).prev_sample
        if i > 0:  # diffusers keeps the corrected state of step i as last_sample
            corrected = sched.last_sample * (1 + sigma**2) ** 0.5
            torch.testing.assert_close(states[i], corrected, rtol=1e-5, atol=1e-5)
