"""Per-family defaults (Forge's presets) for FLUX.1 / SD3.5: the families, SD3.5 Large Turbo detection, the API's
omitted fields (the UI's update rule is tested in a browser: test_flow_defaults_browser.py)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx

from modules.checkpoints import families
from modules.pipeline.job import with_family_defaults
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures.make_tiny_checkpoint import save_safetensors_deterministic
from tests.fixtures.make_tiny_mmdit import all_in_one, make_all_in_one


def test_family_presets() -> None:
    d = families.defaults
    assert d(families.FLUX_DEV) == {"steps": 20, "cfg_scale": 1.0, "sampler_name": "Euler", "scheduler": "Simple",
                                    "distilled_cfg_scale": 3.5}
    assert d(families.FLUX_SCHNELL) == {"steps": 4, "cfg_scale": 1.0, "sampler_name": "Euler", "scheduler": "Simple"}
    assert (d(families.SD35_LARGE)["steps"], d(families.SD35_LARGE)["cfg_scale"]) == (28, 3.5)
    assert (d(families.SD35_MEDIUM)["steps"], d(families.SD35_MEDIUM)["cfg_scale"]) == (40, 4.5)
    assert (d(families.SD35_LARGE_TURBO)["steps"], d(families.SD35_LARGE_TURBO)["cfg_scale"]) == (4, 1.0)
    assert d(None) == {}


def test_large_turbo_is_told_from_large_by_metadata_or_name(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    folder = tmp_path / "models" / "Stable-diffusion"
    by_name = make_all_in_one("sd35-large", folder / "sd3.5_large_turbo.safetensors")
    by_meta = folder / "my-model.safetensors"
    save_safetensors_deterministic(all_in_one("sd35-large"), by_meta,
                                   {"modelspec.title": "Stable Diffusion 3.5 Large Turbo"})
    plain = make_all_in_one("sd35-large", folder / "sd3.5_large.safetensors")
    for path, arch in ((by_name, "sd35-large-turbo"), (by_meta, "sd35-large-turbo"), (plain, "sd35-large")):
        engine.load_model(path)
        assert engine.require_model().spec.arch == arch, path.name
    engine.load_model(by_name)
    result = engine.txt2img(with_family_defaults(
        Txt2ImgParams(prompt="a fox", width=64, height=64, seed=1, save_images=False,
                      model_defaults=("steps", "cfg_scale", "sampler_name", "scheduler")),
        engine.require_model().spec.family))
    assert "Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1," in result.infotexts[0]


def test_params_take_family_defaults_only_for_unset_fields() -> None:
    p = Txt2ImgParams(prompt="x", steps=30, cfg_scale=7.0, model_defaults=("cfg_scale", "distilled_cfg_scale"))
    flux = with_family_defaults(p, families.FLUX_DEV)
    assert (flux.steps, flux.cfg_scale, flux.distilled_cfg_scale) == (30, 1.0, 3.5)
    assert with_family_defaults(p, None) is p  # SD: A1111's values stay


def test_api_omitted_fields_follow_the_flow_family(tmp_path: Path) -> None:
    from tests.api_server import start_server

    schnell = make_all_in_one("flux-schnell", tmp_path / "schnell.safetensors")
    server = start_server(tmp_path, {"tiny-schnell": schnell})
    try:
        body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 5,
                "override_settings": {"sd_model_checkpoint": "tiny-schnell"}}
        first = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert first.status_code == 200, first.text
        info = json.loads(first.json()["info"])
        assert "Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1," in info["infotexts"][0]
        assert first.json()["parameters"]["steps"] == 50  # the request echo stays A1111's
        sent = {**body, "steps": 3, "cfg_scale": 2.0, "sampler_name": "DPM++ 2M"}
        second = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=sent, timeout=300)
        text = json.loads(second.json()["info"])["infotexts"][0]
        assert "Steps: 3, Sampler: DPM++ 2M," in text and "CFG scale: 2," in text
    finally:
        server.stop()


def test_api_omitted_fields_keep_a1111_defaults_on_sd() -> None:
    from modules.server.convert import omitted_model_defaults
    from modules.server.schemas import Txt2ImgRequest

    req = Txt2ImgRequest(prompt="x", steps=12, sampler_index="Euler a")
    assert omitted_model_defaults(req) == ("cfg_scale", "distilled_cfg_scale", "scheduler")
    sd = with_family_defaults(Txt2ImgParams(prompt="x", model_defaults=("cfg_scale",)), None)
    assert sd.cfg_scale == Txt2ImgParams(prompt="x").cfg_scale

