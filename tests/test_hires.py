"""Hires fix on tiny checkpoints: A1111's target sizes, upscalers, second-pass settings and infotext."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules import infotext
from modules.pipeline.control import JobControl
from modules.pipeline.hires import hires_target
from modules.pipeline.params import Txt2ImgParams
from modules.pipeline.txt2img import TXT2IMG
from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import UpscalerSpec
from modules.text import prompt_parser
from tests.conftest import make_engine

UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
             "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest")


def params(**kw) -> Txt2ImgParams:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=3, sampler_name="Euler a", width=64,
                height=64, seed=42, rng_source="cpu", save_images=False, enable_hr=True, hr_scale=1.5,
                hr_second_pass_steps=2, denoising_strength=0.5)
    base.update(kw)
    return Txt2ImgParams(**base)


@pytest.mark.parametrize("kw,expected", [
    (dict(hr_scale=2.0), (128, 128, 0, 0)),
    (dict(hr_scale=1.3), (83, 83, 0, 0)),
    (dict(hr_resize_x=128), (128, 128, 0, 0)),
    (dict(width=96, height=64, hr_resize_y=96), (144, 96, 0, 0)),
    (dict(width=96, height=64, hr_resize_x=128, hr_resize_y=128), (192, 128, 8, 0)),
    (dict(width=96, height=64, hr_resize_x=160, hr_resize_y=96), (160, 106, 0, 1)),
])
def test_target_size_as_a1111(kw, expected):
    assert hires_target(params(**kw)) == expected


def test_upscaler_registry_has_a1111_names(sd1_engine):
    names = sd1_engine.registries.upscalers.names()
    assert all(name in names for name in UPSCALERS)
    assert sd1_engine.registries.upscalers.get("Latent").latent_mode == "bilinear"


@pytest.mark.parametrize("upscaler", UPSCALERS)
def test_every_upscaler(sd1_engine, upscaler):
    result = sd1_engine.txt2img(params(hr_upscaler=upscaler))
    assert result.images[0].size == (96, 96)
    assert np.asarray(result.images[0]).std() > 0
    fields = infotext.parse(result.infotexts[0])
    assert fields["Hires upscaler"] == upscaler and (fields["Size-1"], fields["Size-2"]) == ("64", "64")


def test_resize_to_with_truncation(sd1_engine):
    result = sd1_engine.txt2img(params(width=96, height=64, hr_resize_x=128, hr_resize_y=128))
    assert result.images[0].size == (128, 128)
    fields = infotext.parse(result.infotexts[0])
    assert (fields["Hires resize-1"], fields["Hires resize-2"]) == ("128", "128")


def test_infotext_keys_in_a1111_order(sd1_engine):
    text = sd1_engine.txt2img(params(hr_sampler_name="Euler", hr_scheduler="Karras", hr_prompt="a blue square",
                                     hr_negative_prompt="red")).infotexts[0]
    last = text.splitlines()[-1]
    keys = [part.split(":")[0] for part in last.split(", ")]
    order = ["Denoising strength", "Hires sampler", "Hires prompt", "Hires negative prompt", "Hires schedule type",
             "Hires upscale", "Hires steps", "Hires upscaler", "Version"]
    assert [k for k in keys if k in order] == order
    fields = infotext.parse(text)
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires steps"]) == ("0.5", "1.5", "2")
    assert fields["Hires sampler"] == "Euler" and fields["Hires prompt"] == "a blue square"
    plain = infotext.parse(sd1_engine.txt2img(params(enable_hr=False)).infotexts[0])
    assert "Denoising strength" not in plain and "Hires upscale" not in plain


def test_second_pass_has_its_own_steps_and_prompts(sd1_engine):
    seen = []
    job = sd1_engine.new_job(params(hr_second_pass_steps=4, denoising_strength=0.3), on_progress=seen.append)
    calls = []
    original = job.conditioner.for_batch

    def spy(prompts, negatives, steps, hires_steps=None):
        calls.append((prompts[0], steps, hires_steps))
        return original(prompts, negatives, steps, hires_steps)

    job.conditioner.for_batch = spy
    sd1_engine.run(job)
    assert [p.step for p in seen] == list(range(1, 8)) and seen[-1].steps == 7
    assert len(TXT2IMG.inputs(job).hires.plan.sigmas) == 5  # exactly 4 steps: the end of an int(4 / 0.3) = 13-step schedule
    assert calls == [("a red circle", 3, None), ("a red circle", 3, 4)]
    same = TXT2IMG.inputs(sd1_engine.new_job(params(hr_second_pass_steps=0)))
    assert same.hires.steps == 3


def test_prompt_editing_continues_into_the_hires_pass():
    # A1111: with hires steps, fractions span 1..2 and integers count on from the first pass's steps
    assert prompt_parser.get_learned_conditioning_prompt_schedules(["[a:b:1.5]"], 10, 4) == [[[2, "a"], [4, "b"]]]
    assert prompt_parser.get_learned_conditioning_prompt_schedules(["[a:b:12]"], 10, 4) == [[[2, "a"], [4, "b"]]]
    assert prompt_parser.get_learned_conditioning_prompt_schedules(["[a:b:0.5]"], 10, 4) == [[[4, "b"]]]


def test_denoising_zero_skips_the_second_sampling(sd1_engine):
    seen = []
    result = sd1_engine.txt2img(params(denoising_strength=0.0), on_progress=seen.append)
    assert result.images[0].size == (96, 96) and [p.step for p in seen] == [1, 2, 3]


def test_interrupted_first_pass_is_not_upscaled(sd1_engine):
    control = JobControl()

    def on_progress(progress):
        if progress.step == 1:
            control.interrupt()

    result = sd1_engine.txt2img(params(n_iter=2), control, on_progress)
    assert result.interrupted and [im.size for im in result.images] == [(64, 64)]


@pytest.mark.parametrize("arch", ["sd1-inpaint", "sd2", "sdxl"])
def test_hires_on_other_architectures(arch, tiny_checkpoints, tmp_path):
    engine = make_engine(tmp_path)
    engine.load_model(tiny_checkpoints[arch])
    for upscaler in ("Latent", "Lanczos"):
        assert engine.txt2img(params(hr_upscaler=upscaler, steps=2)).images[0].size == (96, 96)


class DoubleUpscaler:
    """An extension's pixel upscaler, registered through the hook."""

    calls: list = []

    @hookimpl
    def register_upscalers(self):
        def double(image: Image.Image, scale: float) -> Image.Image:
            self.calls.append(scale)
            return image.resize((image.width * 2, image.height * 2), Image.Resampling.BOX)

        return [UpscalerSpec("Double", function=double)]


def test_an_extension_upscaler_is_used(tiny_sd1, tmp_path):
    from modules.app import build_app
    from modules.settings import Settings

    plugin = DoubleUpscaler()
    settings = Settings(models_dir=tmp_path / "m", outputs_dir=tmp_path / "o", data_dir=tmp_path / "d",
                        device="cpu", precision="fp32")
    engine = build_app(settings, extra_plugins=(plugin,)).engine
    engine.load_model(tiny_sd1)
    result = engine.txt2img(params(hr_upscaler="Double"))
    assert result.images[0].size == (96, 96) and plugin.calls == [1.5]
    assert infotext.parse(result.infotexts[0])["Hires upscaler"] == "Double"


@pytest.mark.parametrize("field,value,message", [
    ("hr_upscaler", "ESRGAN_5x", "Unknown upscaler 'ESRGAN_5x'"),
    ("hr_scale", 0.5, "hr_scale must be between"),
    ("hr_scale", 100.0, "hr_scale must be between"),
    ("hr_resize_x", 10, "hr_resize_x must be between"),
    ("hr_second_pass_steps", -1, "hr_second_pass_steps must be between"),
    ("denoising_strength", 2.0, "denoising_strength must be between"),
    ("hr_sampler_name", "Nope", "Unknown sampler 'Nope'"),
])
def test_bad_hires_params(sd1_engine, field, value, message):
    from modules.errors import InvalidParams

    with pytest.raises(InvalidParams, match=message):
        sd1_engine.txt2img(params(**{field: value}))


def test_too_large_hires_target_is_refused(sd1_engine):
    from modules.errors import InvalidParams

    with pytest.raises(InvalidParams, match="would make a 8192x8192 image"):
        sd1_engine.txt2img(params(width=1024, height=1024, hr_scale=8.0))
