"""The Extras and upscaler routes of /sdapi/v1 over HTTP, on a real server with tiny upscaler files."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api_server import start_server
from tests.fixtures import make_tiny_upscalers as tiny

# A1111 1.10's modules/api/models.py: ExtrasBaseRequest and its two subclasses.
A1111_EXTRAS_FIELDS = {"resize_mode", "show_extras_results", "gfpgan_visibility", "codeformer_visibility",
                       "codeformer_weight", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h",
                       "upscaling_crop", "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility",
                       "upscale_first"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras-api")
    models = root / "models"
    tiny.write(tiny.esrgan_old(2), models / "ESRGAN" / "4x-UltraSharp.pth")
    tiny.write(tiny.esrgan_basicsr(2), models / "RealESRGAN" / "RealESRGAN_x2plus.pth", wrap="params_ema")
    tiny.write(tiny.srvgg(4), models / "upscale_models" / "4x-Compact.safetensors")
    srv = start_server(root)
    yield srv
    srv.stop()


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image_of(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _random(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_request_models_have_a1111_fields():
    from modules.server.extras_api import ExtrasBatchImagesRequest, ExtrasSingleImageRequest, FileData

    assert set(ExtrasSingleImageRequest.model_fields) == A1111_EXTRAS_FIELDS | {"image"}
    assert set(ExtrasBatchImagesRequest.model_fields) == A1111_EXTRAS_FIELDS | {"imageList"}
    assert set(FileData.model_fields) == {"data", "name"}
    defaults = ExtrasSingleImageRequest()
    assert (defaults.upscaling_resize, defaults.upscaler_1, defaults.upscaling_crop, defaults.resize_mode) == (
        2, "None", True, 0)


def test_upscaler_lists(server):
    upscalers = {u["name"]: u for u in httpx.get(f"{server.url}/sdapi/v1/upscalers").json()}
    assert {"None", "Lanczos", "Nearest", "4x-UltraSharp", "R-ESRGAN 2x+", "4x-Compact"} <= set(upscalers)
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in upscalers.values())
    ultra = upscalers["4x-UltraSharp"]
    assert ultra["model_path"].endswith("ESRGAN/4x-UltraSharp.pth") and ultra["scale"] == 4
    assert ultra["model_name"] == "ESRGAN" and upscalers["Lanczos"]["model_path"] is None
    assert not any(name.startswith("Latent") for name in upscalers)
    real = httpx.get(f"{server.url}/sdapi/v1/realesrgan-models").json()
    assert real == [{"name": "R-ESRGAN 2x+", "path": upscalers["R-ESRGAN 2x+"]["model_path"], "scale": 2}]
    assert httpx.get(f"{server.url}/sdapi/v1/face-restorers").json() == []


@pytest.mark.parametrize("upscaler", ["4x-UltraSharp", "R-ESRGAN 2x+", "RealESRGAN_x2plus", "4x-Compact"])
def test_single_image_scale_by_is_exact(server, upscaler):
    image = _random(24, 18)
    r = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=120,
                   json={"image": _b64(image), "upscaler_1": upscaler, "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"html_info", "image"}
    assert _image_of(body["image"]).size == (48, 36)
    assert f"Postprocess upscaler: {upscaler}" in body["html_info"]
    assert "Postprocess upscale by: 2" in body["html_info"]


def test_single_image_scale_to_crop_and_second_upscaler(server):
    image = _random(20, 20, seed=1)
    base = {"image": _b64(image), "upscaler_1": "4x-Compact", "resize_mode": 1, "upscaling_resize_w": 50,
            "upscaling_resize_h": 30}
    cropped = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", json=base, timeout=120).json()
    assert _image_of(cropped["image"]).size == (50, 30)
    uncropped = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=120,
                           json={**base, "upscaling_crop": False}).json()
    assert _image_of(uncropped["image"]).size == (50, 50)
    blended = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=120, json={
        **base, "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 1.0}).json()
    nearest = image.resize((50, 50), Image.Resampling.NEAREST).crop((0, 10, 50, 40))
    assert np.array_equal(np.asarray(_image_of(blended["image"]).convert("RGB")), np.asarray(nearest))
    assert "Postprocess upscaler 2: Nearest" in blended["html_info"]


def test_batch_images(server):
    images = [_random(16, 12, seed=i) for i in range(3)]
    r = httpx.post(f"{server.url}/sdapi/v1/extra-batch-images", timeout=120, json={
        "imageList": [{"data": _b64(im), "name": f"{i}.png"} for i, im in enumerate(images)],
        "upscaler_1": "4x-UltraSharp", "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    out = [_image_of(d) for d in r.json()["images"]]
    assert [o.size for o in out] == [(48, 36)] * 3
    assert out[0].tobytes() != out[1].tobytes()
    hidden = httpx.post(f"{server.url}/sdapi/v1/extra-batch-images", timeout=120, json={
        "imageList": [{"data": _b64(images[0]), "name": "a.png"}], "upscaler_1": "Lanczos",
        "show_extras_results": False}).json()
    assert hidden["images"] == []


@pytest.mark.parametrize("change,status,message", [
    ({"gfpgan_visibility": 0.5}, 422, "models/GFPGAN"),
    ({"codeformer_visibility": 0.5}, 422, "models/Codeformer"),
    ({"upscaler_1": "4x-Nope"}, 422, "Unknown upscaler '4x-Nope' for upscaler_1"),
    ({"upscaler_2": "Latent", "extras_upscaler_2_visibility": 0.5}, 422, "Unknown upscaler 'Latent'"),
    ({"upscaling_resize": 9}, 422, "upscaling_resize"),
    ({"image": "not base64!"}, 422, "not valid base64"),
    ({"upscaling_resize": 8, "upscaler_1": "Lanczos", "image": None}, 422, "the limit is"),
])
def test_bad_requests_are_4xx_with_a_message(server, change, status, message):
    big = _random(600, 600)
    body = {"image": _b64(_random(8, 8)), "upscaler_1": "4x-UltraSharp", **change}
    if body["image"] is None:
        body["image"] = _b64(big)
    r = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", json=body, timeout=60)
    assert r.status_code == status and message in r.text, r.text
    assert "Traceback" not in r.text


def test_empty_batch_is_refused(server):
    r = httpx.post(f"{server.url}/sdapi/v1/extra-batch-images", json={"imageList": []})
    assert r.status_code == 422 and "imageList is empty" in r.text


@pytest.mark.parametrize("model,message", [("clip", "needs a BLIP captioning model"),
                                           ("deepdanbooru", "needs model-resnet_custom_v3.pt"),
                                           ("blip9", "Unknown interrogation model 'blip9'")])
def test_interrogate_is_a_clear_4xx(server, model, message):
    r = httpx.post(f"{server.url}/sdapi/v1/interrogate", json={"image": _b64(_random(8, 8)), "model": model})
    assert r.status_code == 422 and message in r.text and "Traceback" not in r.text


def test_extras_is_a_job_of_the_caller(server):
    image = _random(12, 12)
    r = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=120,
                   json={"image": _b64(image), "upscaler_1": "4x-Compact", "upscaling_resize": 2})
    assert r.status_code == 200
    jobs = httpx.get(f"{server.url}/api/v1/jobs").json()
    listed = jobs["jobs"] if isinstance(jobs, dict) else jobs
    extras_jobs = [j for j in listed if j["kind"] == "extras"]
    assert extras_jobs and extras_jobs[0]["state"] == "done"
    assert extras_jobs[0]["params"]["upscaler_1"] == "4x-Compact"


def test_extras_payload_round_trips_and_needs_no_checkpoint():
    from modules.jobs.payload import JobPayload, build_params
    from modules.pipeline.extras import ExtrasJobParams

    params = build_params(ExtrasJobParams, {"upscaler_1": "4x-Compact", "upscaling_resize": 3, "resize_mode": 1,
                                            "upscaling_crop": False, "extras_upscaler_2_visibility": 0.25})
    payload = JobPayload("extras", params, "")
    back = JobPayload.from_json(payload.to_json())
    assert back.params == params and isinstance(back.params.upscaling_resize, float)
    assert ExtrasJobParams.needs_checkpoint is False


def test_extras_job_stops_between_tiles_when_interrupted(tmp_path):
    from modules.pipeline.control import JobControl
    from modules.pipeline.extras import ExtrasJobParams, run_extras
    from modules.plugins.manager import build_plugin_manager, build_registries
    from modules.settings import Settings

    tiny.write(tiny.srvgg(2), tmp_path / "models" / "ESRGAN" / "2x-Tiny.safetensors")
    settings = Settings(models_dir=tmp_path / "models", device="cpu", precision="fp32", upscaler_tile=16,
                        upscaler_tile_overlap=4)
    registries = build_registries(build_plugin_manager(), settings)
    params = ExtrasJobParams(upscaler_1="2x-Tiny", init_images=(_random(64, 64), _random(64, 64, seed=2)))
    seen = []
    whole = run_extras(registries, params, JobControl(), lambda p: seen.append((p.job_no, p.step, p.steps)))
    assert len(whole.images) == 2 and not whole.interrupted and seen[-1] == (1, seen[-1][2], seen[-1][2])
    control = JobControl()

    def interrupt_after_first_tile(progress) -> None:
        control.interrupt()

    stopped = run_extras(registries, params, control, interrupt_after_first_tile)
    assert stopped.interrupted and stopped.images == []
