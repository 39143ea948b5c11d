"""sd-webui-controlnet's API over real HTTP: /controlnet/* routes, alwayson_scripts in the named and the
positional form, and every error case as a 4xx naming the problem."""
from __future__ import annotations

import base64
import hashlib
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from extensions.controlnet import preprocessors
from modules.server.extension_routes import RESERVED_ROOTS, root_prefix_problem, root_routes_for_extensions
from tests.api_server import start_server
from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet

SMALL = {"prompt": "a red circle", "negative_prompt": "green", "steps": 3, "width": 64, "height": 64, "seed": 5,
         "sampler_name": "Euler", "cfg_scale": 7}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (12, 20, 50, 44))
    return image


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("cn-api")
    folder = tmp / "models" / "ControlNet"
    folder.mkdir(parents=True)
    for arch in ("sd1", "sdxl"):
        shutil.copy(make_tiny_controlnet(arch, tmp / "src" / f"cn-{arch}.safetensors", seed=3),
                    folder / f"cn-{arch}.safetensors")
    srv = start_server(tmp, {"tiny-sd1": tiny_checkpoints["sd1"], "tiny-sdxl": tiny_checkpoints["sdxl"]})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=600) as client:
        yield client


def sha8(server, name: str) -> str:
    path = server.context.app.settings.models_dir / "ControlNet" / f"{name}.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_hook_register_root_api_routes(server, http):
    assert http.get("/controlnet/version").json() == {"version": 2}
    assert http.get("/ext/controlnet/version").json() == {"version": 2}
    for prefix in ("/sdapi", "/ext", "/api", "/docs", "/a/b", "nope", "/../x"):
        assert root_prefix_problem(prefix, set()) is not None, prefix
    assert "sdapi" in RESERVED_ROOTS and root_prefix_problem("/controlnet", {"controlnet"}) is not None
    mounted = root_routes_for_extensions(server.context.app.plugins, {"controlnet"})
    assert mounted == []  # a taken prefix is refused (and recorded on the extension)
    errors = [e.message for e in server.context.app.plugins.extension("controlnet").hook_errors]
    assert any("already served" in m for m in errors)


def test_model_module_type_and_settings_routes(server, http):
    models = http.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    assert models == [f"cn-sd1 [{sha8(server, 'cn-sd1')}]", f"cn-sdxl [{sha8(server, 'cn-sdxl')}]"]
    assert http.get("/controlnet/model_list", params={"update": "false"}).json()["model_list"] == models
    modules = http.get("/controlnet/module_list").json()
    assert {"none", "canny", "invert", "scribble_xdog", "tile_resample", "inpaint_only"} <= set(modules["module_list"])
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is False and [s["name"] for s in canny["sliders"]] == [
        "Preprocessor Resolution", "Canny Low Threshold", "Canny High Threshold"]
    aliased = http.get("/controlnet/module_list", params={"alias_names": "true"}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliased
    types = http.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_option"] == "canny" and "canny" in types["Canny"]["module_list"]
    assert types["All"]["model_list"] == ["None", *models]
    assert http.get("/controlnet/settings").json() == {"control_net_unit_count": 3}


def test_detect_runs_a_preprocessor_and_refuses_bad_requests(http, tmp_path):
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(picture())],
            "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}
    response = http.post("/controlnet/detect", json=body)
    assert response.status_code == 200 and response.json()["info"] == "Success"
    expected = preprocessors.canny(np.asarray(picture()), 100, 200)
    assert np.array_equal(decode(response.json()["images"][0]), expected)
    for change, words in (({"controlnet_module": "cany"}, "Module not available"),
                          ({"controlnet_input_images": []}, "No image selected"),
                          ({"controlnet_module": "inpaint_only"}, "requires `controlnet_masks`"),
                          ({"controlnet_module": "depth_midas"}, "dpt_hybrid-midas-501f0c75.pt"),
                          ({"controlnet_input_images": ["not base64!"]}, "not a readable base64 image")):
        response = http.post("/controlnet/detect", json={**body, **change})
        assert response.status_code == 422 and words in str(response.json()["detail"]), change


def generate(http, args=None, script="controlnet", **extra):
    payload = {**SMALL, **extra}
    if args is not None:
        payload["alwayson_scripts"] = {script: {"args": args}}
    return http.post("/sdapi/v1/txt2img", json=payload)


def test_named_and_positional_forms_give_the_same_image(server, http):
    http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"})
    plain = generate(http)
    named = generate(http, [{"enabled": True, "input_image": b64(picture()), "module": "none",
                             "model": f"cn-sd1 [{sha8(server, 'cn-sd1')}]", "weight": 1, "resize_mode": "Crop and Resize",
                             "control_mode": "Balanced", "low_vram": False, "processor_res": 512, "threshold_a": -1,
                             "threshold_b": -1, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False}])
    positional = generate(http, [[True, "none", "cn-sd1", 1.0, b64(picture()), 1, False, 512, -1, -1, 0.0, 1.0,
                                  False, 0]], script="ControlNet")
    assert plain.status_code == named.status_code == positional.status_code == 200, named.text
    images = [decode(r.json()["images"][0]) for r in (plain, named, positional)]
    assert np.array_equal(images[1], images[2])
    assert np.abs(images[0].astype(float) - images[1]).mean() > 1.0
    info = named.json()["info"]
    assert 'ControlNet 0: \\"Module: none, Model: cn-sd1 [' in info or 'ControlNet 0: "Module: none, Model: cn-sd1 [' in info
    assert "Resize Mode: Crop and Resize" in info and "Control Mode: Balanced" in info


UNIT = {"input_image": None, "module": "none", "model": "cn-sd1"}


@pytest.mark.parametrize(("change", "words"), [
    ({"module": "cany"}, "unknown module 'cany'"),
    ({"model": "missing-model"}, "model 'missing-model' not found"),
    ({"model": "None"}, "names no model"),
    ({"weight": 3}, "weight"),
    ({"weight": "heavy"}, "must be a number"),
    ({"control_mode": "Loud"}, "control_mode"),
    ({"resize_mode": 7}, "resize_mode"),
    ({"input_image": "%%%"}, "not a readable base64 image"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"guidance_end": 1.5}, "guidance_end"),
    ({"input_image": "", "image": None}, "has no image"),
    ({"model": "cn-sdxl"}, "is a SDXL ControlNet, but the loaded checkpoint is SD1.5"),
])
def test_unit_errors_are_422_naming_the_field(http, change, words):
    http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"})
    unit = {**UNIT, "input_image": b64(picture()), **change}
    response = generate(http, [unit])
    assert response.status_code == 422, response.text
    assert words in response.text


def test_sd15_controlnet_on_sdxl_names_both_architectures(http):
    response = generate(http, [{**UNIT, "input_image": b64(picture())}],
                        override_settings={"sd_model_checkpoint": "tiny-sdxl"})
    assert response.status_code == 422
    assert "SD1.5 ControlNet, but the loaded checkpoint is SDXL" in response.text


def test_payload_shape_errors(http):
    too_many = [{**UNIT, "input_image": b64(picture())}] * 4
    response = generate(http, too_many)
    assert response.status_code == 422 and "at most 3" in response.text
    response = generate(http, [[True, "none", "cn-sd1"] + [0] * 20])
    assert response.status_code == 422 and "positional values" in response.text
    response = generate(http, [{**UNIT, "input_image": b64(picture()), "image": b64(picture())}])
    assert response.status_code == 422 and "both 'input_image' and 'image'" in response.text
