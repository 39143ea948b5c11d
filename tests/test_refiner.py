"""The refiner (A1111 1.10's refiner_checkpoint / refiner_switch_at) on tiny checkpoints, on the CPU.

Per-step checks record every guided prediction through the public `wrap_denoiser` hook.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules import infotext
from modules.errors import InvalidParams
from modules.pipeline.hooks import DenoiserWrapper, NoHooks
from modules.pipeline.params import Img2ImgParams, Txt2ImgParams
from modules.pipeline.refiner import switch_step
from tests.conftest import make_engine
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint

BASE = dict(prompt="a red circle", negative_prompt="blue", steps=4, sampler_name="Euler", width=64, height=64,
            seed=11, rng_source="cpu", save_images=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine with base (SD1), other (SD1, other weights), sd2v (v-prediction, OpenCLIP) and xl (SDXL)."""
    root = tmp_path_factory.mktemp("refiner")
    folder = root / "models" / "Stable-diffusion"
    make_tiny_checkpoint("sd1", folder / "base.safetensors", seed=0)
    make_tiny_checkpoint("sd1", folder / "other.safetensors", seed=1)
    make_tiny_checkpoint("sd2-v", folder / "sd2v.safetensors", seed=2)
    make_tiny_checkpoint("sdxl", folder / "xl.safetensors", seed=3)
    engine = make_engine(root)
    engine.load_model("base")
    return engine


class Recorder(NoHooks):
    """Job hooks that keep each pass's guided predictions, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor]] = []

    def wrap_denoiser(self, denoiser, context):
        calls, name = self.calls, context.pass_name

        class Record(DenoiserWrapper):
            def __call__(self, x, sigma):
                out = self.inner(x, sigma)
                calls.append((name, out.clone()))
                return out

        return Record(denoiser)


def run(engine, params):
    hooks = Recorder()
    params.validate(engine.settings.limits)
    result = engine.run(engine.new_job(params, hooks=hooks))
    return result, hooks.calls


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_switch_step_is_a_fraction_of_the_steps():
    assert switch_step(0.8, 10) == 8 and switch_step(0.7, 10) == 7 and switch_step(0.5, 4) == 2
    assert switch_step(0.0, 4) == 0 and switch_step(1.0, 4) == 4 and switch_step(0.99, 10) == 10


@pytest.mark.parametrize("extra", [dict(refiner_checkpoint="other", refiner_switch_at=1.0),
                                   dict(refiner_checkpoint="other"), dict(refiner_switch_at=0.5),
                                   dict(refiner_checkpoint="None", refiner_switch_at=0.5)])
def test_no_switch_is_bit_identical_to_no_refiner(engine, extra):
    plain = engine.txt2img(Txt2ImgParams(**BASE))
    other = engine.txt2img(Txt2ImgParams(**BASE, **extra))
    assert np.array_equal(pixels(plain.images[0]), pixels(other.images[0]))
    assert "Refiner" not in infotext.parse(other.infotexts[0])
    assert engine.models.refiner is None  # a job without a refiner frees the slot


def test_refiner_equal_to_base_gives_the_same_image(engine):
    plain = engine.txt2img(Txt2ImgParams(**BASE))
    same = engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint="base", refiner_switch_at=0.5))
    assert np.array_equal(pixels(plain.images[0]), pixels(same.images[0]))
    assert engine.models.refiner is None  # the base model itself; nothing loaded twice


def test_other_refiner_changes_only_the_steps_after_the_switch(engine):
    _, plain = run(engine, Txt2ImgParams(**BASE))
    result, refined = run(engine, Txt2ImgParams(**BASE, refiner_checkpoint="other", refiner_switch_at=0.5))
    assert len(plain) == len(refined) == 4  # Euler: one prediction per step
    for step in (0, 1):
        assert torch.equal(plain[step][1], refined[step][1]), f"step {step} ran before the switch"
    for step in (2, 3):
        assert not torch.allclose(plain[step][1], refined[step][1]), f"step {step} should be the refiner's"
    assert engine.models.current.info.stem == "base" and engine.models.refiner.info.stem == "other"
    fields = infotext.parse(result.infotexts[0])
    other = engine.models.refiner
    assert fields["Refiner"] == f"other [{other.model_hash}]" and fields["Refiner switch at"] == "0.5"
    assert fields["Model"] == "base"


def test_refiner_with_its_own_text_encoder_and_prediction(engine):
    """SD2-v after SD1: the same latent space, another text encoder width and v-prediction."""
    plain = engine.txt2img(Txt2ImgParams(**BASE))
    refined = engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint="sd2v.safetensors", refiner_switch_at=0.25))
    assert pixels(refined.images[0]).std() > 0
    assert not np.array_equal(pixels(plain.images[0]), pixels(refined.images[0]))
    assert infotext.parse(refined.infotexts[0])["Refiner"].startswith("sd2v [")


def test_refiner_by_title_with_hash(engine):
    model = engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint="other", refiner_switch_at=0.5))
    title = infotext.parse(model.infotexts[0])["Refiner"]
    again = engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint=title, refiner_switch_at=0.5))
    assert np.array_equal(pixels(model.images[0]), pixels(again.images[0]))


def test_img2img_refiner_switches_inside_the_cut_schedule(engine):
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    common = dict(BASE, steps=8, denoising_strength=0.5, init_images=(init,))
    _, plain = run(engine, Img2ImgParams(**common))
    _, refined = run(engine, Img2ImgParams(**common, refiner_checkpoint="other", refiner_switch_at=0.5))
    assert len(plain) == len(refined) == 5  # t_enc = 4: the last 5 steps of 8
    at = switch_step(0.5, 5)
    assert all(torch.equal(plain[i][1], refined[i][1]) for i in range(at))
    assert all(not torch.allclose(plain[i][1], refined[i][1]) for i in range(at, 5))


def test_hires_refiner_runs_in_the_second_pass_only(engine):
    common = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                  hr_second_pass_steps=4)
    _, plain = run(engine, Txt2ImgParams(**common))
    result, refined = run(engine, Txt2ImgParams(**common, refiner_checkpoint="other", refiner_switch_at=0.5))
    first = [i for i, (name, _) in enumerate(plain) if name == "first"]
    hires = [i for i, (name, _) in enumerate(plain) if name == "hires"]
    assert len(first) == 4 and len(hires) == 4
    assert all(torch.equal(plain[i][1], refined[i][1]) for i in first + hires[:2])
    assert all(not torch.allclose(plain[i][1], refined[i][1]) for i in hires[2:])
    assert infotext.parse(result.infotexts[0])["Refiner switch at"] == "0.5"


def test_missing_refiner_is_a_clear_error_and_the_base_stays(engine):
    with pytest.raises(InvalidParams, match="Refiner checkpoint not found: nowhere") as err:
        engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint="nowhere", refiner_switch_at=0.5))
    assert err.value.field == "refiner_checkpoint"
    assert engine.models.current.info.stem == "base"
    assert pixels(engine.txt2img(Txt2ImgParams(**BASE)).images[0]).std() > 0


def test_refiner_of_another_latent_space_is_refused_and_the_base_stays(engine):
    with pytest.raises(InvalidParams, match="latent spaces differ"):
        engine.txt2img(Txt2ImgParams(**BASE, refiner_checkpoint="xl", refiner_switch_at=0.5))
    assert engine.models.current.info.stem == "base" and engine.models.refiner is None
    assert pixels(engine.txt2img(Txt2ImgParams(**BASE)).images[0]).std() > 0


def test_switch_at_out_of_range_is_refused():
    with pytest.raises(InvalidParams, match="refiner_switch_at must be between 0.0 and 1.0"):
        Txt2ImgParams(**BASE, refiner_checkpoint="other", refiner_switch_at=1.5).validate()


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_checkpoints):
    import httpx

    from tests.api_server import start_server

    folder = tmp_path_factory.mktemp("refiner-api")
    other = make_tiny_checkpoint("sd1", folder / "src" / "other.safetensors", seed=1)
    server = start_server(folder, {"base": tiny_checkpoints["sd1"], "other": other, "xl": tiny_checkpoints["sdxl"]})
    with httpx.Client(base_url=server.url, timeout=300) as client:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "base"}).raise_for_status()
        yield client
    server.stop()


API = dict(prompt="a red circle", steps=4, sampler_name="Euler", width=64, height=64, seed=5,
           override_settings={"sd_model_checkpoint": "base"})


def test_api_refiner_fields_and_infotext(http):
    plain = http.post("/sdapi/v1/txt2img", json=API).json()
    answer = http.post("/sdapi/v1/txt2img", json={**API, "refiner_checkpoint": "other.safetensors",
                                                  "refiner_switch_at": 0.5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["parameters"]["refiner_checkpoint"] == "other.safetensors"
    assert body["parameters"]["refiner_switch_at"] == 0.5
    import json

    text = json.loads(body["info"])["infotexts"][0]
    fields = infotext.parse(text)
    assert fields["Refiner"].startswith("other [") and fields["Refiner switch at"] == "0.5"
    assert body["images"][0] != plain["images"][0]
    same = http.post("/sdapi/v1/txt2img", json={**API, "refiner_checkpoint": "other", "refiner_switch_at": 1.0})
    assert same.json()["images"][0] == plain["images"][0]
    init = plain["images"][0]
    img = http.post("/sdapi/v1/img2img", json={**API, "init_images": [init], "denoising_strength": 0.5,
                                               "refiner_checkpoint": "other", "refiner_switch_at": 0.5})
    assert img.status_code == 200, img.text
    assert "Refiner: other [" in json.loads(img.json()["info"])["infotexts"][0]


def test_api_unknown_refiner_is_a_422_before_queueing(http):
    answer = http.post("/sdapi/v1/txt2img", json={**API, "refiner_checkpoint": "nowhere", "refiner_switch_at": 0.5})
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", "refiner_checkpoint"] and "nowhere" in detail["msg"]


def test_api_incompatible_refiner_fails_clearly_and_the_base_keeps_working(http):
    answer = http.post("/sdapi/v1/txt2img", json={**API, "refiner_checkpoint": "xl", "refiner_switch_at": 0.5})
    assert answer.status_code == 422, answer.text
    assert "latent spaces differ" in answer.text and "Traceback" not in answer.text
    assert http.post("/sdapi/v1/txt2img", json=API).status_code == 200


def test_infotext_refiner_keys_reach_the_ui_fields():
    from modules.ui.bindings import field_defaults, values_from_infotext

    text = "a fox\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64, Refiner: other [0123456789], Refiner switch at: 0.6"
    values = values_from_infotext(infotext.parse(text), field_defaults(Txt2ImgParams))
    assert values["refiner_checkpoint"] == "other [0123456789]" and float(values["refiner_switch_at"]) == 0.6


def test_per_model_helpers_never_outlive_their_model(engine):
    """A released refiner's id() may be reused by the next model: its text encoder must not be."""
    import weakref

    class Model:
        pass

    gone, new = Model(), Model()
    engine._per_model[id(new)] = {"model": weakref.ref(gone), "text": "the released model's"}
    assert engine._cached(new, "text", lambda: "its own") == "its own"
    assert engine._cached(new, "text", lambda: "built again") == "its own"
