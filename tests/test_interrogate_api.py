"""/sdapi/v1/interrogate over HTTP on a real server with tiny random interrogation models."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from modules.interrogate.options import InterrogateOptions
from modules.interrogate.service import InterrogateFolders, Interrogator
from tests.api_server import start_server
from tests.interrogate_helpers import install_models

SHORT = {"interrogate_clip_min_length": 3, "interrogate_clip_max_length": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrogate-api")
    install_models(root / "models")
    srv = start_server(root)
    assert httpx.post(f"{srv.url}/sdapi/v1/options", json=SHORT).status_code == 200
    yield srv
    srv.stop()


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/interrogate", json=body, timeout=120)


@pytest.mark.parametrize("model", ["clip", "deepdanbooru"])
def test_interrogate_answers_the_engines_caption(server, model):
    r = _post(server, {"image": _b64(_image()), "model": model})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"caption"}
    options = InterrogateOptions.from_options(SHORT)
    direct = Interrogator(InterrogateFolders.under(server.context.app.settings.models_dir))
    assert r.json()["caption"] == direct.interrogate(_image(), model, options)
    assert _post(server, {"image": _b64(_image()), "model": model}).json() == r.json()  # deterministic


def test_data_url_and_options_reach_the_tagger(server):
    url = "data:image/png;base64," + _b64(_image(1))
    options = {"interrogate_deepbooru_score_threshold": 0.0, "deepbooru_use_spaces": False,
               "deepbooru_escape": False}
    assert httpx.post(f"{server.url}/sdapi/v1/options", json=options).status_code == 200
    try:
        caption = _post(server, {"image": url, "model": "deepdanbooru"}).json()["caption"]
    finally:
        httpx.post(f"{server.url}/sdapi/v1/options", json={"interrogate_deepbooru_score_threshold": 0.5,
                                                           "deepbooru_use_spaces": True, "deepbooru_escape": True})
    assert "blue_(color)" in caption.split(", ") and "rating:safe" not in caption


def test_interrogation_options_are_listed_and_checked(server):
    values = httpx.get(f"{server.url}/sdapi/v1/options").json()
    assert values["interrogate_deepbooru_score_threshold"] == 0.5 and values["deepbooru_sort_alpha"] is True
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"interrogate_deepbooru_score_threshold": 2})
    assert r.status_code == 422 and "interrogate_deepbooru_score_threshold" in r.text


@pytest.mark.parametrize("body,message", [
    ({"image": "not base64!", "model": "clip"}, "not valid base64"),
    ({"image": base64.b64encode(b"junk bytes").decode(), "model": "deepdanbooru"}, "not an image"),
    ({"model": "clip"}, "expected a base64-encoded image"),
    ({"image": "", "model": "blip2"}, "Unknown interrogation model 'blip2'"),
])
def test_bad_payloads_are_clear_4xx(server, body, message):
    r = _post(server, body)
    assert r.status_code == 422 and message in r.text and "Traceback" not in r.text, r.text


def test_missing_models_are_a_4xx_naming_the_files(tmp_path):
    srv = start_server(tmp_path)
    try:
        for model, message in (("clip", "models/BLIP"), ("deepdanbooru", "model-resnet_custom_v3.pt")):
            r = _post(srv, {"image": _b64(_image()), "model": model})
            assert r.status_code == 422 and message in r.text and "Traceback" not in r.text, r.text
        install_models(tmp_path / "models", ("deepdanbooru",))  # added while the server runs
        assert _post(srv, {"image": _b64(_image()), "model": "deepdanbooru"}).status_code == 200
    finally:
        srv.stop()


def test_a_broken_model_file_is_a_4xx_and_the_loaded_one_keeps_working(server):
    folder = server.context.app.settings.models_dir / "torch_deepdanbooru"
    before = _post(server, {"image": _b64(_image()), "model": "deepdanbooru"}).json()["caption"]
    broken = folder / "a-broken.pt"  # sorts first, but the canonical file name is preferred
    broken.write_bytes(b"not a torch file")
    try:
        assert _post(server, {"image": _b64(_image()), "model": "deepdanbooru"}).json()["caption"] == before
        good = folder / "model-resnet_custom_v3.pt"
        good.rename(folder / "kept.bak")
        try:
            r = _post(server, {"image": _b64(_image()), "model": "deepdanbooru"})
            assert r.status_code == 422 and "a-broken.pt cannot be read as weights only" in r.text, r.text
        finally:
            (folder / "kept.bak").rename(good)
    finally:
        broken.unlink()
    assert _post(server, {"image": _b64(_image()), "model": "deepdanbooru"}).json()["caption"] == before


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_answer_500(server, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from tests.test_api_fuzz import check_route

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    route = next(op for op in operations if op.path == "/sdapi/v1/interrogate")
    assert check_route(route, schemathesis.GenerationMode(mode), server.url) >= 1
