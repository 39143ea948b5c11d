"""Face restoration over real HTTP: txt2img / img2img `restore_faces` with the infotext read back,
the options and override_settings, Extras' GFPGAN / CodeFormer fields, /sdapi/v1/face-restorers,
the X/Y/Z "Face restore" axis, and absent weights answered 422 naming the files.

Tiny random GFPGAN / CodeFormer weights and a RetinaFace whose heads are set to report faces
(tests/fixtures/make_tiny_faces.py) sit in the models folders users fill.
"""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from modules import infotext
from modules.ui.bindings import values_from_infotext
from tests.api_server import start_server
from tests.fixtures import make_tiny_faces as mk

SMALL = dict(width=64, height=64, steps=1, sampler_name="Euler", seed=7, cfg_scale=5.0, prompt="a face")


def write_face_models(models) -> None:
    (models / "GFPGAN").mkdir(parents=True, exist_ok=True)
    (models / "Codeformer").mkdir(parents=True, exist_ok=True)
    (models / "facedetection").mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": mk.gfpgan_state_dict()}, models / "GFPGAN" / "GFPGANv1.4.pth")
    torch.save({"params_ema": mk.codeformer_state_dict()}, models / "Codeformer" / "codeformer-v0.1.0.pth")
    # 80 pixels between the eyes at the 640-pixel detection scale: 8 pixels in a 64-pixel image
    detector = mk.crafted_detector(mk.retinaface_state_dict(), eye_distance=80.0)
    torch.save({f"module.{k}": v for k, v in detector.items()}, models / "facedetection" /
               "detection_mobilenet0.25_Final.pth")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("faces-api")
    write_face_models(root / "models")
    srv = start_server(root, {"tiny": tiny_sd1})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("faces-absent"))
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_of(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def generate(http, kind: str = "txt2img", **payload) -> tuple[np.ndarray, dict]:
    r = http.post(f"/sdapi/v1/{kind}", json={**SMALL, **payload})
    assert r.status_code == 200, r.text
    return image_of(r.json()["images"][0]), json.loads(r.json()["info"])


def test_face_restorers_list_the_installed_ones(http):
    listed = http.get("/sdapi/v1/face-restorers").json()
    assert [r["name"] for r in listed] == ["CodeFormer", "GFPGAN"]
    assert all(set(r) == {"name", "cmd_dir"} for r in listed)
    assert listed[0]["cmd_dir"].endswith("models/Codeformer") and listed[1]["cmd_dir"].endswith("models/GFPGAN")


def test_txt2img_restore_faces_writes_the_infotext_that_reads_back(http):
    plain, plain_info = generate(http)
    restored, info = generate(http, restore_faces=True)
    assert plain_info["restore_faces"] is False and "Face restoration" not in plain_info["infotexts"][0]
    assert info["restore_faces"] is True and info["face_restoration_model"] == "CodeFormer"
    assert "Face restoration: CodeFormer" in info["infotexts"][0]
    assert (plain != restored).any()
    parsed = infotext.parse(info["infotexts"][0])
    values = values_from_infotext(parsed, {"restore_faces": False, "face_restoration_model": "GFPGAN"})
    assert values["restore_faces"] is True and values["face_restoration_model"] == "CodeFormer"
    assert values_from_infotext(infotext.parse(plain_info["infotexts"][0]), {"restore_faces": True})[
        "restore_faces"] is False


def test_the_model_comes_from_options_and_override_settings(http):
    _, by_override = generate(http, restore_faces=True, override_settings={"face_restoration_model": "GFPGAN"})
    assert "Face restoration: GFPGAN" in by_override["infotexts"][0]
    assert http.post("/sdapi/v1/options", json={"face_restoration_model": "GFPGAN", "code_former_weight": 0.25}
                     ).status_code == 200
    try:
        assert http.get("/sdapi/v1/options").json()["face_restoration_model"] == "GFPGAN"
        _, by_option = generate(http, restore_faces=True)
        assert "Face restoration: GFPGAN" in by_option["infotexts"][0]
    finally:
        http.post("/sdapi/v1/options", json={"face_restoration_model": "CodeFormer", "code_former_weight": 0.5})


def test_code_former_weight_is_used(http):
    a, _ = generate(http, restore_faces=True, override_settings={"code_former_weight": 0.0})
    b, _ = generate(http, restore_faces=True, override_settings={"code_former_weight": 1.0})
    assert (a != b).any()


def test_img2img_restore_faces(http):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain, _ = generate(http, "img2img", init_images=[b64(init)], denoising_strength=0.5)
    restored, info = generate(http, "img2img", init_images=[b64(init)], denoising_strength=0.5, restore_faces=True)
    assert "Face restoration: CodeFormer" in info["infotexts"][0] and (plain != restored).any()


def test_extras_face_fields(http):
    source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"image": b64(source), "upscaler_1": "None"}
    results = {}
    for name, change in (("gfpgan", {"gfpgan_visibility": 1.0}), ("half", {"gfpgan_visibility": 0.5}),
                         ("cf0", {"codeformer_visibility": 1.0, "codeformer_weight": 0.0}),
                         ("cf1", {"codeformer_visibility": 1.0, "codeformer_weight": 1.0}),
                         ("both", {"gfpgan_visibility": 1.0, "codeformer_visibility": 0.5, "codeformer_weight": 0.3,
                                   "upscaler_1": "Lanczos", "upscaling_resize": 2, "upscale_first": True})):
        r = http.post("/sdapi/v1/extra-single-image", json={**body, **change})
        assert r.status_code == 200, r.text
        results[name] = (image_of(r.json()["image"]).astype(int), r.json()["html_info"])
    before = np.asarray(source).astype(int)
    full, half = results["gfpgan"][0], results["half"][0]
    assert (full != before).any()
    assert np.abs(half - (before + (full - before) * 0.5)).max() <= 1
    assert (results["cf0"][0] != results["cf1"][0]).any()
    both, html_info = results["both"]
    assert both.shape == (128, 128, 3)
    for text in ("GFPGAN visibility: 1.0", "CodeFormer visibility: 0.5", "CodeFormer weight: 0.3",
                 "Postprocess upscaler: Lanczos"):
        assert text in html_info
    batch = http.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64(source), "name": "a.png"}], "codeformer_visibility": 1.0, "upscaler_1": "None"})
    assert batch.status_code == 200 and len(batch.json()["images"]) == 1


def test_xyz_face_restore_axis(http):
    args = {"x_type": "Face restore", "x_values": "False, CodeFormer, GFPGAN", "include_lone_images": True}
    r = http.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "X/Y/Z plot", "script_args": args})
    assert r.status_code == 200, r.text
    texts = json.loads(r.json()["info"])["infotexts"][1:]
    assert [infotext.parse(t).get("Face restoration") for t in texts] == [None, "CodeFormer", "GFPGAN"]
    bad = http.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "X/Y/Z plot",
                                               "script_args": {"x_type": "Face restore", "x_values": "Maybe"}})
    assert bad.status_code == 422 and "'Maybe'" in bad.text


@pytest.mark.parametrize("kind,body,words", [
    ("txt2img", {"restore_faces": True}, ["codeformer-v0.1.0.pth", "models/Codeformer",
                                          "detection_Resnet50_Final.pth", "models/facedetection"]),
    ("txt2img", {"restore_faces": True, "override_settings": {"face_restoration_model": "GFPGAN"}},
     ["GFPGANv1.4.pth", "models/GFPGAN"]),
    ("txt2img", {"restore_faces": True, "override_settings": {"face_restoration_model": "Nope"}},
     ["Unknown face restoration model 'Nope'"]),
    ("extra-single-image", {"gfpgan_visibility": 0.5, "image": "<image>"}, ["GFPGANv1.4.pth", "models/GFPGAN"]),
    ("extra-single-image", {"codeformer_visibility": 0.5, "image": "<image>"}, ["models/Codeformer"]),
])
def test_absent_weights_are_a_422_naming_the_files(bare, kind, body, words):
    if body.get("image") == "<image>":
        body = {**body, "image": b64(Image.new("RGB", (8, 8)))}
    r = httpx.post(f"{bare.url}/sdapi/v1/{kind}", json={**SMALL, **body}, timeout=60)
    assert r.status_code == 422, r.text
    assert all(w in r.text for w in words), r.text
    assert "Traceback" not in r.text
    assert httpx.get(f"{bare.url}/sdapi/v1/face-restorers").json() == []


def test_prompts_from_file_restore_faces_flag(http):
    args = {"checkbox_iterate": False, "prompt_position": "start",
            "prompt_txt": '--prompt "a face" --restore_faces true\nplain'}
    r = http.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "Prompts from file or textbox",
                                             "script_args": args})
    assert r.status_code == 200, r.text
    texts = json.loads(r.json()["info"])["infotexts"]
    assert ["Face restoration" in t for t in texts] == [True, False]


@pytest.mark.parametrize("script", [
    {"name": "Prompts from file or textbox", "args": {"prompt_position": "start",
                                                      "prompt_txt": '--prompt "a face" --restore_faces true'}},
    {"name": "X/Y/Z plot", "args": {"x_type": "Face restore", "x_values": "False, GFPGAN"}},
])
def test_scripts_turning_restoration_on_are_checked_for_weights(tmp_path, tiny_sd1, script):
    """Refused at submit time, with the files named, before anything is queued."""
    from modules.errors import InvalidParams
    from modules.jobs.local import local_jobs
    from modules.jobs.model import Caller
    from modules.jobs.submit import Submission
    from tests.api_server import models_dir_with
    from tests.plugin_helpers import ext_app

    models_dir_with(tmp_path, {"tiny": tiny_sd1})
    app = ext_app(tmp_path)
    with local_jobs(app) as (jobs, submitter):
        with pytest.raises(InvalidParams, match="models/(Codeformer|GFPGAN)") as err:
            submitter.submit(Caller("t"), Submission("txt2img", {k: v for k, v in SMALL.items()}, script=script))
        assert "detection_Resnet50_Final.pth" in str(err.value)
        assert jobs.list(Caller("t")) == []
