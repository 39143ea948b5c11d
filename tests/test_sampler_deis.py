"""DEIS in ComfyUI's default "tab" mode, in float64 on a toy denoiser, against an independent
reference: the VP schedule solved from its two end conditions, the weights integrated in VP time
against dsigma/dt by scipy's adaptive quadrature, and the ODE solved by scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from modules.errors import InvalidParams
from modules.plugins.builtins.samplers import register_samplers
from modules.sampling import samplers_deis as D
from modules.sampling import samplers_extra as E

W = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
B = torch.tensor([0.05, -0.1], dtype=torch.float64)


def eps_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x @ W.T / (1 + sigma**2) ** 0.5 + B * (1 + 0.1 * sigma)


def denoiser(x, sigma_batch):
    sigma = float(sigma_batch.reshape(-1)[0])
    return x - sigma * eps_fn(x, sigma)


def karras(n: int) -> list[float]:
    return [*E.karras_sigmas(n, 0.03, 14.6), 0.0]


def x_start(sigma: float) -> torch.Tensor:
    return torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma


def reference_schedule():
    """g(t) = a t^2 + b t with g(1e-3) = log(1 + 0.002^2) and g(1) = log(1 + 80^2), solved as a linear system."""
    lhs = np.array([[1e-6, 1e-3], [1.0, 1.0]])
    a, b = np.linalg.solve(lhs, [math.log(1 + 0.002**2), math.log(1 + 80.0**2)])
    sigma = lambda t: math.sqrt(math.exp(a * t * t + b * t) - 1)  # noqa: E731
    dsigma = lambda t: math.exp(a * t * t + b * t) * (2 * a * t + b) / (2 * sigma(t))  # noqa: E731
    time = lambda s: (-b + math.sqrt(b * b + 4 * a * math.log(1 + s * s))) / (2 * a)  # noqa: E731
    return sigma, dsigma, time


def reference_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    _, dsigma, time = reference_schedule()
    nodes = [time(sigmas[i - k]) for k in range(order)]
    out = []
    for j in range(order):
        def basis(t, j=j):
            return math.prod((t - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j)
        value, _ = integrate.quad(lambda t: basis(t) * dsigma(t), time(sigmas[i]), time(sigmas[i + 1]),
                                  epsabs=1e-14, epsrel=1e-13)
        out.append(value)
    return out


def reference_deis(x: torch.Tensor, sigmas: list[float], max_order: int = 3) -> torch.Tensor:
    history = []
    for i in range(len(sigmas) - 1):
        d = eps_fn(x, sigmas[i])
        history = [d, *history][:max_order]
        if sigmas[i + 1] == 0:
            x = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            x = x + sum(c * h for c, h in zip(reference_coefficients(sigmas, i, len(history)), history, strict=True))
    return x


def test_vp_time_is_the_schedule_comfyui_fits():
    sigma, _, time = reference_schedule()
    assert D.vp_time(0.002) == pytest.approx(1e-3, rel=1e-9) and D.vp_time(80.0) == pytest.approx(1.0, rel=1e-12)
    for s in (0.03, 1.0, 14.6):
        assert D.vp_time(s) == pytest.approx(time(s), rel=1e-10)
        assert sigma(float(D.vp_time(s))) == pytest.approx(s, rel=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_tab_coefficients_equal_the_integral_in_vp_time(order):
    sigmas = karras(10)
    for i in range(order - 1, len(sigmas) - 2):
        np.testing.assert_allclose(D.tab_coefficients(sigmas, i, order), reference_coefficients(sigmas, i, order),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_order", [2, 3, 4])
def test_sample_deis_tab_equals_the_reference(max_order):
    sigmas = karras(10)
    x = x_start(sigmas[0])
    got = D.sample_deis(denoiser, x, torch.tensor(sigmas, dtype=torch.float64), max_order=max_order)
    torch.testing.assert_close(got, reference_deis(x, sigmas, max_order), rtol=1e-9, atol=1e-9)


def test_tab_is_not_rhoab_and_rhoab_is_the_sigma_space_form():
    sigmas = torch.tensor(karras(10), dtype=torch.float64)
    x = x_start(float(sigmas[0]))
    tab = D.sample_deis(denoiser, x, sigmas)
    rhoab = D.sample_deis(denoiser, x, sigmas, deis_mode="rhoab")
    torch.testing.assert_close(rhoab, E.sample_deis(denoiser, x, sigmas), rtol=0, atol=0)
    assert (tab - rhoab).abs().max() > 1e-6


def test_tab_converges_to_the_ode_solution():
    def exact(x0: torch.Tensor, sigma_end: float) -> torch.Tensor:
        rhs = lambda s, y: eps_fn(torch.from_numpy(y).reshape(4, 2), s).reshape(-1).numpy()  # noqa: E731
        sol = integrate.solve_ivp(rhs, (14.6, sigma_end), x0.reshape(-1).numpy(), rtol=1e-12, atol=1e-12,
                                  method="DOP853")
        return torch.from_numpy(sol.y[:, -1]).reshape(4, 2)

    x = x_start(14.6)
    target = exact(x, 0.03)
    errors = []
    for n in (8, 16, 32):
        sigmas = torch.tensor(E.karras_sigmas(n, 0.03, 14.6), dtype=torch.float64)  # ends at 0.03: no Euler step
        errors.append(float((D.sample_deis(denoiser, x, sigmas) - target).abs().max()))
    # the first (Euler) step limits the global order to 2 on these coarse Karras steps, as for rhoab
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5


def test_deis_is_registered_in_tab_mode_and_bad_options_are_named():
    spec = next(s for s in register_samplers() if s.name == "DEIS")
    assert spec.function is D.sample_deis and spec.options["deis_mode"] == "tab"
    sigmas = torch.tensor(karras(4), dtype=torch.float64)
    with pytest.raises(InvalidParams, match="deis_mode"):
        D.sample_deis(denoiser, x_start(14.6), sigmas, deis_mode="taab")
    with pytest.raises(InvalidParams, match="max_order"):
        D.sample_deis(denoiser, x_start(14.6), sigmas, max_order=5)
