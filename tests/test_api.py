"""The A1111-compatible API over real HTTP, driven by the `webuiapi` client from PyPI and by raw requests."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from modules import infotext
from tests.api_server import start_server

webuiapi = pytest.importorskip("webuiapi")
SMALL = dict(width=64, height=64, steps=2, sampler_name="Euler", seed=42)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    folder = tmp_path_factory.mktemp("api")
    broken = folder / "zz-broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    srv = start_server(folder, {"tiny-sd1": tiny_checkpoints["sd1"], "tiny-sd2": tiny_checkpoints["sd2"],
                                "zz-broken": broken})
    yield srv
    srv.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_webuiapi_txt2img(api):
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", batch_size=2, **SMALL)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [42, 43] and result.info["seed"] == 42
    fields = infotext.parse(result.info["infotexts"][0])
    assert fields["Prompt"] == "a red circle" and fields["Sampler"] == "Euler" and fields["Steps"] == "2"
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a red circle"


def test_override_settings_apply_to_that_job_only(api):
    with_override = api.txt2img(prompt="x", override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL)
    plain = api.txt2img(prompt="x", **SMALL)
    assert infotext.parse(with_override.info["infotexts"][0])["Clip skip"] == "2"
    assert "Clip skip" not in plain.info["infotexts"][0]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1


def test_options_and_model_switching(api):
    titles = api.util_get_model_names()
    assert any(t.startswith("tiny-sd2.safetensors") for t in titles)
    api.util_set_model("tiny-sd2")
    assert api.util_get_current_model().startswith("tiny-sd2.safetensors [")
    result = api.txt2img(prompt="x", **SMALL)
    assert infotext.parse(result.info["infotexts"][0])["Model"] == "tiny-sd2"
    api.set_options({"sd_model_checkpoint": "tiny-sd1"})
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-sd1.safetensors")
    assert infotext.parse(api.txt2img(prompt="x", **SMALL).info["infotexts"][0])["Model"] == "tiny-sd1"


def test_lists_and_system_routes(api, http):
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    for route in ("sd-vae", "upscalers", "latent-upscale-modes", "prompt-styles", "loras", "hypernetworks",
                  "face-restorers", "realesrgan-models", "script-info", "extensions"):
        assert isinstance(http.get(f"/sdapi/v1/{route}").json(), list), route
    assert {"Lanczos", "Nearest", "None"} <= {u["name"] for u in http.get("/sdapi/v1/upscalers").json()}
    latent = [m["name"] for m in http.get("/sdapi/v1/latent-upscale-modes").json()]
    assert latent[0] == "Latent" and "Latent (nearest-exact)" in latent and "Lanczos" not in latent
    scripts = api.get_scripts()
    assert "x/y/z plot" in scripts["txt2img"] and "sd upscale" in scripts["img2img"]
    assert "sd upscale" not in scripts["txt2img"]
    assert http.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert api.get_memory()["ram"]["total"] > 0
    assert http.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    flags = api.get_cmd_flags()
    assert flags["nowebui"] is True and flags["api_auth"] is None
    assert http.get("/docs").status_code == 200 and "/sdapi/v1/txt2img" in http.get("/openapi.json").text


def test_png_info(api):
    image = api.txt2img(prompt="a cat", **SMALL).image
    info = api.png_info(image)
    assert info.info.startswith("a cat\nSteps: 2")
    assert info.json["parameters"]["Seed"] == "42"


def test_progress_and_interrupt_keep_partial_images(api, server):
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=api.txt2img(
        prompt="long", width=64, height=64, steps=400, sampler_name="Euler", seed=1)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 1:
            break
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 400
    assert progress["current_image"] and progress["eta_relative"] >= 0
    Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).load()
    api.interrupt()
    worker.join(60)
    result = outcome["r"]
    assert result.info["interrupted"] is True and len(result.images) == 1
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_is_accepted(api):
    assert api.skip() == {}


def test_runtime_failures_do_not_stop_the_worker(http):
    bad = http.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "zz-broken"}})
    assert bad.status_code == 500 and "broken" in bad.json()["detail"]
    good = http.post("/sdapi/v1/txt2img", json=SMALL)
    assert good.status_code == 200 and len(good.json()["images"]) == 1


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("payload", "loc"), [
    ({"steps": -1}, ["body", "steps"]),
    ({"steps": "many"}, ["body", "steps"]),
    ({"width": 8192}, ["body", "width"]),
    ({"width": 100}, ["body", "width"]),
    ({"cfg_scale": [1]}, ["body", "cfg_scale"]),
    ({"sampler_name": "Nope"}, ["body", "sampler_name"]),
    ({"scheduler": "Nope"}, ["body", "scheduler"]),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, ["body", "override_settings", "sd_model_checkpoint"]),
    ({"override_settings": {"randn_source": "quantum"}}, ["body", "override_settings", "randn_source"]),
    ({"prompt": "x" * (50 << 20)}, ["body", "prompt"]),
    ({"script_name": "No such script"}, ["body", "script_name"]),
    ({"script_name": "X/Y/Z plot", "script_args": [9, "Euler, Nope"]}, ["body", "script_args"]),
    ({"width": 2048, "override_settings": {"max_size": 4096}}, ["body", "width"]),  # limits are policy
    ({"batch_size": 65}, ["body", "batch_size"]),
    ({"steps": 1001}, ["body", "steps"]),
    ({"enable_hr": True, "hr_scale": 8.0, "width": 256, "height": 256}, ["body", "hr_scale"]),  # 2048 > 1024
    ({"override_settings": {"CLIP_stop_at_last_layers": 99}}, ["body", "clip_skip"]),
])
def test_bad_txt2img_input_answers_422_with_the_field(http, payload, loc):
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, **payload})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


def test_override_settings_outside_the_whitelist_are_ignored_with_a_warning(http):
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"max_size": 8192, "samples_format": "jpg"}})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["warnings"] == ["override_settings ignored (not a per-job setting here): max_size, samples_format"]


@pytest.mark.parametrize(("payload", "loc"), [
    ({"init_images": ["%%% not base64"]}, ["body", "init_images", 0]),
    ({"init_images": [base64.b64encode(b"hello").decode()]}, ["body", "init_images", 0]),
    ({"init_images": ["data:text/html;base64,aGk="]}, ["body", "init_images", 0]),
    ({"init_images": []}, ["body", "init_images"]),
    ({"init_images": [_b64(Image.new("RGB", (64, 64)))], "mask": "???"}, ["body", "mask"]),
    ({"init_images": [_b64(Image.new("RGB", (2048, 64)))]}, ["body", "init_images", 0]),
])
def test_bad_img2img_input_answers_422_with_the_field(http, payload, loc):
    response = http.post("/sdapi/v1/img2img", json={**SMALL, **payload})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


def test_bad_png_info_and_options(http):
    assert http.post("/sdapi/v1/png-info", json={"image": "@@@"}).status_code == 422
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing"}).status_code == 422
    assert http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"}).status_code == 422
    assert http.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"}
                     ).status_code == 422
    assert http.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # and the worker is still fine


def test_webuiapi_img2img_with_mask(api):
    from modules.pipeline import engine

    if not hasattr(engine.Engine, "img2img"):
        pytest.skip("Engine.img2img has not landed yet")
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt="a blue square", denoising_strength=0.8,
                         width=64, height=64, steps=4, sampler_name="Euler", seed=3, inpainting_fill=1)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    fields = infotext.parse(result.info["infotexts"][0])
    assert fields["Denoising strength"] == "0.8"
    corner = result.images[0].getpixel((2, 2))
    assert abs(corner[0] - 200) < 40  # outside the mask the init image is kept


def test_positional_alwayson_script_args_are_refused(http):
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"X": {"args": [1, 2]}}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:3] == ["body", "alwayson_scripts", "X"]
