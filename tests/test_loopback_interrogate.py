"""Loopback's append_interrogation over real HTTP: each loop's prompt is the job's prompt plus the
interrogation (CLIP, DeepBooru or WD14) of that loop's init image; an absent model is refused before queueing."""
from __future__ import annotations

import base64
import importlib.util
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from modules.interrogate.options import InterrogateOptions
from modules.interrogate.service import InterrogateFolders, Interrogator
from tests.api_server import start_server
from tests.interrogate_helpers import install_models

OPTIONS = {"interrogate_clip_min_length": 3, "interrogate_clip_max_length": 6,
           "interrogate_deepbooru_score_threshold": 0.0, "deepbooru_sort_alpha": False,
           "interrogate_return_ranks": True}  # scores in the text: two images never read the same
SMALL = dict(width=64, height=64, steps=1, sampler_name="Euler", seed=42, cfg_scale=5.0, denoising_strength=0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("loopback-interrogate")
    srv = start_server(root, {"tiny": tiny_checkpoints["sd1"]})
    install_models(srv.context.app.settings.models_dir)
    if importlib.util.find_spec("onnxruntime"):  # the WD14 tagger runs on onnxruntime (the wd14 extra)
        from tests.test_interrogate_wd14 import write_tagger
        write_tagger(srv.context.app.settings.models_dir / "interrogators" / "tiny-tagger")
    assert httpx.post(f"{srv.url}/sdapi/v1/options", json=OPTIONS).status_code == 200
    yield srv
    srv.stop()


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _init() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _loopback(server, prompt: str, choice: str) -> httpx.Response:
    body = {**SMALL, "prompt": prompt, "init_images": [_b64(_init())], "script_name": "Loopback",
            "script_args": [2, 0.4, "Linear", choice]}
    return httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=300)


@pytest.mark.parametrize("choice,model", [("DeepBooru", "deepdanbooru"), ("CLIP", "clip"), ("WD14", "wd14")])
def test_each_loop_appends_the_interrogation_of_its_init_image(server, choice, model):
    if model == "wd14":
        pytest.importorskip("onnxruntime")
    r = _loopback(server, "a fox", choice)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in data["images"]]
    assert len(images) == 1 + 2  # the grid, then the loops
    direct = Interrogator(InterrogateFolders.under(server.context.app.settings.models_dir))
    options = InterrogateOptions.from_options(OPTIONS)
    expected = [f"a fox, {direct.interrogate(source, model, options)}" for source in (_init(), images[1])]
    prompts = [text.split("\nNegative prompt:")[0].split("\nSteps:")[0] for text in info["infotexts"][1:]]
    assert prompts == expected
    assert expected[0] != expected[1]  # the second loop interrogated the first loop's result


def test_an_empty_prompt_is_the_interrogation_alone(server):
    r = _loopback(server, "", "DeepBooru")
    assert r.status_code == 200, r.text
    first = json.loads(r.json()["info"])["infotexts"][1].split("\n")[0]
    assert not first.startswith(",") and "long hair" in first


def test_absent_model_or_bad_choice_is_refused_before_queueing(tmp_path, tiny_checkpoints):
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]})
    try:
        before = len(httpx.get(f"{srv.url}/api/v1/jobs").json()["jobs"])
        r = _loopback(srv, "a fox", "DeepBooru")
        assert r.status_code == 422 and "model-resnet_custom_v3.pt" in r.text and "Loopback" in r.text, r.text
        r = _loopback(srv, "a fox", "WD14")
        assert r.status_code == 422 and "selected_tags.csv" in r.text and "Loopback" in r.text, r.text
        r = _loopback(srv, "a fox", "BLIP2")
        assert r.status_code == 422 and "append_interrogation must be one of None, CLIP, DeepBooru" in r.text
        assert len(httpx.get(f"{srv.url}/api/v1/jobs").json()["jobs"]) == before
    finally:
        srv.stop()
