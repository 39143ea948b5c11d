"""Euler written from scratch against the sampler contract, and a linear-in-sigma schedule."""
import torch

from modules.plugins import api


def sample_fixture_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + api.to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


def uniform_linear(steps: int, context: api.ScheduleContext) -> torch.Tensor:
    sigmas = torch.linspace(context.sigma_max, context.sigma_min, steps)
    return torch.cat([sigmas, sigmas.new_zeros(1)])
