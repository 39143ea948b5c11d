"""Euler CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance").

Plain Euler moves x along (x - denoised) / sigma. CFG++ takes the guided prediction as the
new clean estimate but re-noises along the *unconditional* direction, which keeps samples
on the data manifold at low guidance: use a CFG scale of about 1 to 2.
The model handed to samplers offers `guidance(x, sigma)`, which returns an
`api.DenoiserStep` with the uncond prediction; without it (or at CFG scale 1, where the
uncond is skipped) this is exactly Euler.
"""
from __future__ import annotations

from modules.plugins import api


def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Algorithm: x_next = denoised + sigma_next * (x - uncond) / sigma."""
    extra_args = extra_args or {}
    guidance = getattr(model, "guidance", None)
    values = [float(s) for s in sigmas]
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        sigma_batch = x.new_full((x.shape[0],), sigma)
        if guidance is not None:
            step = guidance(x, sigma_batch, **extra_args)
            denoised = step.denoised
            uncond = step.uncond if step.uncond is not None else denoised
        else:
            denoised = uncond = model(x, sigma_batch, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = denoised + api.to_d(x, sigma, uncond) * sigma_next
    return x


@api.hookimpl
def register_samplers() -> list[api.SamplerSpec]:
    return [api.SamplerSpec("Euler CFG++", sample_euler_cfg_pp, ("euler_cfg_pp", "k_euler_cfg_pp"),
                            default_scheduler="uniform")]
