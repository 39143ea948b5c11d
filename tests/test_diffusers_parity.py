"""Our txt2img latents against diffusers' StableDiffusionPipeline on the same tiny weights."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from modules.pipeline.params import Txt2ImgParams  # noqa: E402
from modules.sampling.rng import randn  # noqa: E402
from tests.stage_helpers import run_recorded  # noqa: E402

SEED = 1234
PROMPT = "a red circle on a blue background"
NEGATIVE = "green"
STEPS = 10  # linspace(999, 0, 10) hits whole timesteps, so both interpolations agree


def _scheduler_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _diffusers_latents(engine, scheduler) -> torch.Tensor:
    model = engine.require_model()
    pipe = diffusers.StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=engine.tokenizer(), unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = randn(SEED, (4, 8, 8), "cpu")[None]
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0,
                   latents=noise, height=64, width=64, output_type="latent")
    return out.images


def _our_latents(engine, sampler: str, scheduler: str) -> torch.Tensor:
    params = Txt2ImgParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler_name=sampler,
                           scheduler=scheduler, cfg_scale=7.0, seed=SEED, width=64, height=64,
                           rng_source="cpu", save_images=False)
    _, hooks = run_recorded(engine, params)
    return hooks.values["sampling"][0].latents


def test_euler_matches_diffusers(sd1_engine):
    scheduler = diffusers.EulerDiscreteScheduler(**_scheduler_kwargs(), timestep_spacing="linspace")
    expected = _diffusers_latents(sd1_engine, scheduler)
    ours = _our_latents(sd1_engine, "Euler", "Uniform")
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    assert expected.abs().mean() > 0.05  # a real, non-trivial result
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


def test_ddim_matches_diffusers(sd1_engine):
    # Our DDIM schedule ends at sigma 0 after the t=1 call, which is diffusers' set_alpha_to_one=True.
    scheduler = diffusers.DDIMScheduler(**_scheduler_kwargs(), timestep_spacing="leading", steps_offset=1,
                                        set_alpha_to_one=True, clip_sample=False)
    expected = _diffusers_latents(sd1_engine, scheduler)
    ours = _our_latents(sd1_engine, "DDIM", "Automatic")
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)
