"""The pipeline's seams: stage order and stage hooks, denoiser wrap points, interruption as a value,
the prediction-type denoiser factory, validation once, and the layer rule."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.errors import CheckpointError, InvalidParams
from modules.pipeline.control import JobControl
from modules.pipeline.hooks import DenoiserWrapper, NoHooks, StageHooks
from modules.pipeline.params import GenerationParams, Img2ImgParams, Txt2ImgParams
from modules.sampling.denoisers import ModelDenoiser, VDenoiser, denoiser_class
from modules.settings import DEFAULT_LIMITS
from tests.conftest import make_engine
from tests.stage_helpers import RecordingHooks, run_recorded

ROOT = Path(__file__).resolve().parents[1]
FIRST = ["conditioning", "sampling"]
AFTER = ["decode", "postprocess", "save"]


def params(**kw) -> Txt2ImgParams:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=3, sampler_name="Euler", width=64,
                height=64, seed=7, rng_source="cpu", save_images=False)
    return Txt2ImgParams(**{**base, **kw})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_stage_order_txt2img_hires_and_img2img(sd1_engine):
    _, hooks = run_recorded(sd1_engine, params(n_iter=2))
    assert hooks.stages == ["inputs", *FIRST, *AFTER, *FIRST, *AFTER]
    _, hooks = run_recorded(sd1_engine, params(enable_hr=True, hr_scale=1.5, denoising_strength=0.5))
    assert hooks.stages == ["inputs", *FIRST, "upscale", *FIRST, *AFTER]
    assert hooks.values["upscale"][0].latents.shape[2:] == (12, 12)
    init = sd1_engine.txt2img(params()).images[0]
    _, hooks = run_recorded(sd1_engine, Img2ImgParams(init_images=(init,), steps=4, sampler_name="Euler",
                                                      width=64, height=64, seed=1, save_images=False))
    assert hooks.stages == ["inputs", *FIRST, *AFTER]


def test_after_stage_may_replace_a_stage_value(sd1_engine):
    class Flip(RecordingHooks):
        def after_stage(self, name, job, value):
            value = super().after_stage(name, job, value)
            if name == "decode":
                return dataclasses.replace(value, images=tuple(im.transpose(0) for im in value.images))
            return value

    plain = sd1_engine.txt2img(params())
    job = sd1_engine.new_job(params(), hooks=Flip(sd1_engine.job_hooks("txt2img")))
    flipped = sd1_engine.run(job)
    assert np.array_equal(pixels(flipped), pixels(plain)[:, ::-1])
    assert not np.array_equal(pixels(flipped), pixels(plain))


class Wrapping(RecordingHooks):
    """Wraps the guided denoiser with `make(inner)` and records what the model wrapper sees."""

    def __init__(self, inner, make=None) -> None:
        super().__init__(inner)
        self.make = make
        self.model_calls: list[tuple[str, int, int]] = []

    def wrap_model(self, model, context):
        def wrapped(x, sigma, cross_attn, pooled=None, concat=None):
            self.model_calls.append((context.pass_name, context.step, len(context.conds)))
            return model(x, sigma, cross_attn, pooled, concat)
        return wrapped

    def wrap_denoiser(self, denoiser, context):
        return self.make(denoiser) if self.make is not None else denoiser


def run_wrapped(engine, p, make=None):
    hooks = Wrapping(engine.job_hooks("txt2img"), make)
    return engine.run(engine.new_job(p, hooks=hooks)), hooks


def test_denoiser_wrappers_see_the_steps_and_can_change_the_result(sd1_engine):
    plain = pixels(sd1_engine.txt2img(params()))
    same, hooks = run_wrapped(sd1_engine, params(), DenoiserWrapper)
    assert np.array_equal(pixels(same), plain)  # a wrapper that only forwards changes nothing
    assert hooks.model_calls == [("first", 0, 1), ("first", 1, 1), ("first", 2, 1)]

    class Damp(DenoiserWrapper):
        def __call__(self, x, sigma):
            return self.inner(x, sigma) * 0.5

    damped, _ = run_wrapped(sd1_engine, params(), Damp)
    assert np.abs(pixels(damped) - plain).mean() > 5

    _, hooks = run_wrapped(sd1_engine, params(enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                                              hr_second_pass_steps=2))
    assert [c[:2] for c in hooks.model_calls] == [("first", 0), ("first", 1), ("first", 2),
                                                  ("hires", 0), ("hires", 1)]


def test_interrupt_is_a_stop_value_and_the_hires_pass_is_not_run(sd1_engine):
    control = JobControl()

    def on_progress(progress):
        if progress.step == 1:
            control.interrupt()

    result, hooks = run_recorded(sd1_engine, params(enable_hr=True, hr_scale=1.5, n_iter=2), control, on_progress)
    assert [s.stop for s in hooks.values["sampling"]] == ["interrupt"]
    assert "upscale" not in hooks.stages and hooks.stages.count("save") == 1  # no second batch either
    assert result.interrupted and [im.size for im in result.images] == [(64, 64)]


def test_skip_is_a_stop_value_for_one_batch(sd1_engine):
    control = JobControl()

    def on_progress(progress):
        if progress.job_no == 0 and progress.step == 1:
            control.skip()

    result, hooks = run_recorded(sd1_engine, params(n_iter=2), control, on_progress)
    assert [s.stop for s in hooks.values["sampling"]] == ["skip", None]
    assert not result.interrupted and len(result.images) == 2


def test_prediction_type_picks_the_denoiser(tiny_sd1, tmp_path):
    assert denoiser_class("eps") is ModelDenoiser and denoiser_class("v") is VDenoiser
    assert denoiser_class("flow").prediction == "flow"
    with pytest.raises(CheckpointError, match="'edm'.*known prediction types: eps, v, flow"):
        denoiser_class("edm")
    engine = make_engine(tmp_path)
    model = engine.load_model(tiny_sd1)
    model.spec = dataclasses.replace(model.spec, prediction="edm")
    with pytest.raises(CheckpointError, match="predicts 'edm'"):
        engine.txt2img(params())


def test_v_prediction_denoised(sd1_engine):
    """v-prediction: denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1); eps: x - eps * sigma."""
    x, out, sigma = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 3.0)
    unet = sd1_engine.require_model().unet
    v = VDenoiser(unet, lambda s: s).to_denoised(x, out, sigma)
    assert torch.allclose(v, torch.tensor(2.0 / 10 - 0.5 * 3 / 10**0.5))
    assert torch.allclose(ModelDenoiser(unet, lambda s: s).to_denoised(x, out, sigma), torch.tensor(0.5))


def test_validation_once(sd1_engine, monkeypatch):
    """engine.txt2img validates at the library edge; generate (behind the job system's edge) never does."""
    calls = []
    validate = Txt2ImgParams.validate

    def counting(self, limits=DEFAULT_LIMITS):
        calls.append(limits)
        return validate(self, limits)

    monkeypatch.setattr(Txt2ImgParams, "validate", counting)
    sd1_engine.txt2img(params())
    assert calls == [sd1_engine.settings.limits]
    calls.clear()
    sd1_engine.generate(params())
    assert calls == []
    with pytest.raises(InvalidParams, match="no task runs"):
        sd1_engine.generate(GenerationParams())


def test_no_hooks_is_a_stage_hooks():
    assert isinstance(NoHooks(), StageHooks)
    from modules.plugins.jobhooks import JobHooks

    missing = [name for name in ("wrap_model", "wrap_denoiser", "before_stage", "after_stage", "prepare",
                                 "patch", "embeddings", "postprocess", "infotext", "saved")
               if not callable(getattr(JobHooks, name, None))]
    assert missing == []


def test_lower_layers_import_nothing_above_them():
    pattern = re.compile(r"^\s*(from|import)\s+modules\.(plugins|jobs|server|ui|cli|app|demo)\b", re.M)
    offenders = []
    for package in ("pipeline", "sampling", "text", "checkpoints"):
        for path in (ROOT / "modules" / package).rglob("*.py"):
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    below = re.compile(r"^\s*(from|import)\s+modules\.pipeline\b", re.M)
    for package in ("sampling", "text", "checkpoints"):
        for path in (ROOT / "modules" / package).rglob("*.py"):
            if below.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_prepare_params_revalidates_only_changed_params(tmp_path):
    from modules.plugins import api, jobhooks
    from modules.plugins.context import JobContext
    from modules.plugins.host import PluginHost
    from modules.plugins.manager import build_plugin_manager, build_registries
    from modules.settings import Settings

    class Widen:
        @api.hookimpl
        def prepare_params(self, params):
            return dataclasses.replace(params, width=params.width + 1) if params.prompt == "widen" else None

    host = PluginHost(build_plugin_manager([Widen()]))
    context = JobContext(Settings(data_dir=tmp_path), build_registries(host))
    unchecked = params(width=65)  # the edge would refuse it; prepare_params trusts its caller
    assert jobhooks.prepare_params(host, unchecked, context).width == 65
    with pytest.raises(InvalidParams, match="width must be a multiple of 8"):
        jobhooks.prepare_params(host, params(prompt="widen"), context)
