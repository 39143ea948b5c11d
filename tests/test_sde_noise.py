"""Which noise the pipeline hands a sampler: A1111's seeded Brownian trees for its SDE samplers
(the default), or sequential per-image draws with `--sde-noise sequential`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.errors import InvalidParams
from modules.pipeline.params import Txt2ImgParams
from modules.pipeline.sampling import SamplingPlan, noise_sampler_for
from modules.plugins.manager import build_plugin_manager, build_registries
from modules.sampling.noise import BrownianTreeNoise, SequentialNoise
from modules.settings import Settings, settings_from_args
from tests.kdiffusion_ref import load_sampling
from tests.plugin_helpers import ext_app

REGISTRIES = build_registries(build_plugin_manager())
SIGMAS = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.03, 0.0])


def plan(name: str, sigmas: torch.Tensor = SIGMAS) -> SamplingPlan:
    return SamplingPlan(REGISTRIES.samplers.get(name), REGISTRIES.schedulers.get("karras"), sigmas, {})


def draw():
    return torch.ones(2, 4)


def test_sde_samplers_get_seeded_brownian_trees_over_the_pass_range():
    x = torch.zeros(2, 4)
    noise = noise_sampler_for(plan("DPM++ 2M SDE"), x, [7, 8], draw)
    assert isinstance(noise, BrownianTreeNoise) and (noise.t0, noise.t1) == pytest.approx((0.03, 14.6))
    reference = load_sampling().BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[7, 8])
    torch.testing.assert_close(noise(6.0, 2.0), reference(torch.tensor(6.0), torch.tensor(2.0)))


def test_sequential_mode_other_samplers_and_one_level_passes_draw_per_call():
    x = torch.zeros(2, 4)
    for p, mode in [(plan("DPM++ 2M SDE"), "sequential"), (plan("Euler a"), "brownian"),
                    (plan("DPM++ SDE", torch.tensor([0.5, 0.0])), "brownian")]:
        noise = noise_sampler_for(p, x, [7, 8], draw, mode)
        assert isinstance(noise, SequentialNoise) and torch.equal(noise(1.0, 0.5), draw())


def test_unknown_noise_mode_is_a_clear_error():
    with pytest.raises(InvalidParams, match="unknown SDE noise 'bogus'.*brownian, sequential"):
        noise_sampler_for(plan("DPM++ 2M SDE"), torch.zeros(2, 4), [7, 8], draw, "bogus")


def test_cli_flag_sets_the_mode():
    import argparse

    from modules.settings import add_settings_arguments

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args([])).sde_noise == Settings().sde_noise == "brownian"
    assert settings_from_args(parser.parse_args(["--sde-noise", "sequential"])).sde_noise == "sequential"
    with pytest.raises(SystemExit):
        parser.parse_args(["--sde-noise", "bogus"])


@pytest.mark.slow
def test_engine_uses_the_mode(tmp_path, tiny_sd1):
    params = Txt2ImgParams(prompt="a red circle", steps=3, sampler_name="DPM++ 2M SDE", width=64, height=64,
                           seed=42, rng_source="cpu", save_images=False)
    images = {}
    for mode in ("brownian", "sequential"):
        app = ext_app(tmp_path / mode, dirs=(), sde_noise=mode)
        app.engine.load_model(tiny_sd1)
        images[mode] = np.asarray(app.engine.txt2img(params).images[0], dtype=np.int16)
    assert np.abs(images["brownian"] - images["sequential"]).max() > 5
