"""Bad input gets a typed error with a clear message; nothing crashes and the engine keeps working."""
from __future__ import annotations

import pytest

from modules.errors import AtelierError, CheckpointError, InvalidParams
from modules.pipeline.params import Txt2ImgParams


def params(**kw) -> Txt2ImgParams:
    base = dict(prompt="x", steps=2, width=64, height=64, seed=1, rng_source="cpu", save_images=False,
                sampler_name="Euler")
    base.update(kw)
    return Txt2ImgParams(**base)


@pytest.mark.parametrize("field,value,message", [
    ("width", 65, "width must be a multiple of 8"),
    ("height", 100, "height must be a multiple of 8"),
    ("width", 0, "width must be between"),
    ("height", 8192, "height must be between"),
    ("width", "64", "width must be a whole number"),
    ("steps", 0, "steps must be between"),
    ("steps", -3, "steps must be between"),
    ("batch_size", 0, "batch_size must be between"),
    ("cfg_scale", float("nan"), "cfg_scale must be a number"),
    ("subseed_strength", 1.5, "subseed_strength must be between"),
    ("seed", 2**40, "seed must be between"),
])
def test_invalid_params(sd1_engine, field, value, message):
    with pytest.raises(InvalidParams, match=message):
        sd1_engine.txt2img(params(**{field: value}))


@pytest.mark.parametrize("field,value,message", [
    ("sampler_name", "Eulerr", "Unknown sampler 'Eulerr'"),
    ("scheduler", "Karras2", "Unknown schedule type 'Karras2'"),
    ("rng_source", "quantum", "quantum"),
])
def test_unknown_names(sd1_engine, field, value, message):
    with pytest.raises(InvalidParams, match=message):
        sd1_engine.txt2img(params(**{field: value}))


def test_engine_still_works_after_errors(sd1_engine):
    with pytest.raises(InvalidParams):
        sd1_engine.txt2img(params(width=63))
    assert len(sd1_engine.txt2img(params()).images) == 1


def test_no_model_loaded(tmp_path):
    from tests.conftest import make_engine

    engine = make_engine(tmp_path)
    with pytest.raises(CheckpointError, match="No model is loaded"):
        engine.txt2img(params())


def test_unknown_checkpoint_name(tmp_path):
    from tests.conftest import make_engine

    engine = make_engine(tmp_path)
    with pytest.raises(CheckpointError, match="Checkpoint not found: missing-model"):
        engine.load_model("missing-model")


def test_fp16_on_cpu_is_refused(tmp_path):
    from modules.app import build_app
    from modules.settings import Settings

    with pytest.raises(InvalidParams, match="fp16 is not supported on the CPU"):
        build_app(Settings(device="cpu", precision="fp16", data_dir=tmp_path))


def test_errors_are_atelier_errors():
    assert issubclass(InvalidParams, AtelierError) and issubclass(CheckpointError, AtelierError)
