"""Forge's VAE / Text Encoder picker (`forge_additional_modules`) and A1111's `sd_vae`, over real HTTP:
options, override_settings, the file lists, infotext, and the errors (the old model keeps working)."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from modules import infotext
from tests.api_server import start_server
from tests.fixtures.make_tiny_mmdit import make_split_files

FLUX_BODY = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
             "cfg_scale": 1}
PICK = ["ae.safetensors", "clip_l.safetensors", "t5xxl_b_fp16.safetensors"]


def write_components(models: Path, root: Path) -> None:
    """Split FLUX.1-schnell parts as users keep them, plus a too-wide T5 that is found first by name
    and a second FLUX VAE, so that only an explicit choice gives a working, different set."""
    split = make_split_files("flux-schnell", root / "split")
    other = make_split_files("flux-schnell", root / "other", seed=7)
    wide_t5 = make_split_files("sd35-large", root / "sd3")["t5xxl"]
    te, vae = models / "text_encoder", models / "VAE"
    te.mkdir(parents=True, exist_ok=True)
    vae.mkdir(parents=True, exist_ok=True)
    shutil.copy(split["clip_l"], te / "clip_l.safetensors")
    shutil.copy(wide_t5, te / "t5xxl_a_fp16.safetensors")
    shutil.copy(split["t5xxl"], te / "t5xxl_b_fp16.safetensors")
    shutil.copy(split["vae"], vae / "ae.safetensors")
    shutil.copy(other["vae"], vae / "flux_other_vae.safetensors")


def write_sd_vae(models: Path, donor: Path) -> None:
    """A 4-channel VAE with other weights than the tiny SD1 checkpoint's own (the SD2 fixture's)."""
    sd = load_file(donor)
    (models / "VAE").mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, models / "VAE" / "sd_other.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("picker")
    flux = make_split_files("flux-schnell", root / "flux")["transformer"]
    running = start_server(root, {"tiny": tiny_checkpoints["sd1"], "flux": flux})
    yield running
    running.stop()


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)


def _image(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))), dtype=np.int16)


def _info(response: httpx.Response) -> dict:
    return infotext.parse(json.loads(response.json()["info"])["infotexts"][0])


def test_missing_parts_are_named_and_the_old_model_stays(server) -> None:
    url = server.url
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, timeout=300).status_code == 200
    refused = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "flux"}, timeout=300)
    assert refused.status_code == 422
    message = refused.json()["detail"][0]["msg"]
    assert ("this FLUX.1-schnell transformer needs clip_l and t5xxl text encoders (models/text_encoder) and the "
            "FLUX VAE (ae.safetensors) (models/VAE)") in message
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny")
    job = _post(server, {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "flux"}})
    assert job.status_code != 200 and "needs clip_l and t5xxl" in job.text
    assert _post(server, FLUX_BODY).status_code == 200  # the SD1 model still works


def test_picker_choice_is_used_recorded_and_listed(server) -> None:
    url, models = server.url, server.context.app.settings.models_dir
    write_components(models, models.parent / "parts")
    listed = {m["model_name"] for m in httpx.get(f"{url}/sdapi/v1/sd-modules").json()}
    assert {"ae.safetensors", "flux_other_vae.safetensors", "clip_l.safetensors", "t5xxl_a_fp16.safetensors",
            "t5xxl_b_fp16.safetensors"} <= listed
    auto = _post(server, {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "flux"}})
    assert auto.status_code != 200, auto.text  # two T5 files by name: ambiguous, a choice is needed
    assert "2 t5xxl text encoders found" in auto.text and "t5xxl_a_fp16.safetensors, t5xxl_b_fp16.safetensors" in auto.text
    assert "forge_additional_modules" in auto.text
    picked = _post(server, {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "flux",
                                                               "forge_additional_modules": PICK}})
    assert picked.status_code == 200, picked.text
    fields = _info(picked)
    assert (fields["Module 1"], fields["Module 2"], fields["Module 3"]) == ("ae", "clip_l", "t5xxl_b_fp16")
    assert fields["VAE"] == "ae.safetensors" and len(fields["VAE hash"]) == 10
    other = ["flux_other_vae", "clip_l", "t5xxl_b_fp16"]  # stems work as well as file names
    swapped = _post(server, {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "flux",
                                                                "forge_additional_modules": other}})
    assert swapped.status_code == 200 and _info(swapped)["Module 1"] == "flux_other_vae"
    assert np.abs(_image(swapped) - _image(picked)).max() > 0  # another VAE decoded it


def test_picker_option_applies_to_later_jobs(server) -> None:
    url = server.url
    saved = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "flux",
                                                         "forge_additional_modules": PICK}, timeout=300)
    assert saved.status_code == 200, saved.text
    assert httpx.get(f"{url}/sdapi/v1/options").json()["forge_additional_modules"] == PICK
    job = _post(server, FLUX_BODY)
    assert job.status_code == 200 and _info(job)["Module 3"] == "t5xxl_b_fp16"
    sd1 = _post(server, {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "tiny"}})
    assert sd1.status_code == 200, sd1.text  # the picked FLUX VAE (16 channels) does not apply to SD1
    assert "VAE" not in _info(sd1) and "Module 1" not in _info(sd1)
    httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny", "forge_additional_modules": []},
               timeout=300).raise_for_status()


@pytest.mark.parametrize("entry", ["nope.safetensors", "../Stable-diffusion/tiny.safetensors", "/etc/passwd"])
def test_bad_picker_entries_are_refused(server, entry: str) -> None:
    job = _post(server, {**FLUX_BODY, "override_settings": {"forge_additional_modules": [entry]}})
    assert job.status_code == 422
    detail = job.json()["detail"][0]
    assert detail["loc"][-2:] == ["override_settings", "forge_additional_modules"] and "not found" in detail["msg"]
    option = httpx.post(f"{server.url}/sdapi/v1/options", json={"forge_additional_modules": [entry]}, timeout=60)
    assert option.status_code == 422 and "models/text_encoder" in option.text
    assert _post(server, FLUX_BODY).status_code == 200


def test_sd_vae_swaps_the_sd_vae_and_automatic_restores_it(server, tiny_checkpoints) -> None:
    url, models = server.url, server.context.app.settings.models_dir
    write_sd_vae(models, tiny_checkpoints["sd2"])
    names = [v["model_name"] for v in httpx.get(f"{url}/sdapi/v1/sd-vae").json()]
    assert "sd_other.safetensors" in names
    assert httpx.post(f"{url}/sdapi/v1/refresh-vae").status_code == 200
    body = {**FLUX_BODY, "override_settings": {"sd_model_checkpoint": "tiny"}}
    own = _post(server, body)
    other = _post(server, {**body, "override_settings": {**body["override_settings"], "sd_vae": "sd_other.safetensors"}})
    assert other.status_code == 200, other.text
    fields = _info(other)
    assert fields["VAE"] == "sd_other.safetensors" and len(fields["VAE hash"]) == 10 and "VAE" not in _info(own)
    assert np.abs(_image(other) - _image(own)).max() > 0
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "sd_other.safetensors"}, timeout=300).status_code == 200
    assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_vae"] == "sd_other.safetensors"
    assert np.array_equal(_image(_post(server, body)), _image(other))
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "Automatic"}, timeout=300).status_code == 200
    assert np.array_equal(_image(_post(server, body)), _image(own))
    bad = httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "missing.safetensors"}, timeout=60)
    assert bad.status_code == 422 and "VAE not found: missing.safetensors" in bad.text
    bad_job = _post(server, {**body, "override_settings": {"sd_vae": "missing.safetensors"}})
    assert bad_job.status_code == 422 and bad_job.json()["detail"][0]["loc"][-1] == "sd_vae"


def test_a_saved_choice_whose_file_is_gone_falls_back(tmp_path: Path) -> None:
    from modules.server.options import Options
    from modules.settings import Settings

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"sd_vae": "gone.safetensors", "forge_additional_modules": ["ae.safetensors"]}))
    options = Options(Settings(models_dir=tmp_path / "models", data_dir=tmp_path), config)
    assert options.get("sd_vae") == "Automatic" and options.get("forge_additional_modules") == []
