"""The memory policy over real HTTP: /sdapi/v1/options sets it, /sdapi/v1/memory reports it, flags win at start."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.api_server import start_server

SMALL = dict(prompt="a red circle", width=64, height=64, steps=2, sampler_name="Euler", seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("memory-api"), {"tiny-sd1": tiny_checkpoints["sd1"]})
    srv.context.app.engine.manage_on_cpu = True  # the CPU is the only device here: manage it anyway
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def set_options(http, **changes) -> httpx.Response:
    return http.post("/sdapi/v1/options", json=changes)


def test_memory_keeps_a1111_shape_and_adds_the_policy(http):
    body = http.get("/sdapi/v1/memory").json()
    assert set(body["ram"]) == {"free", "used", "total"} and "cuda" in body
    policy = body["policy"]
    assert policy["mode"] == "none" and policy["components"] == {} and policy["budget_bytes"] is None
    options = http.get("/sdapi/v1/options").json()
    assert options["memory_policy"] == "none" and options["memory_gpu_weights"] == -1


def test_options_switch_the_policy_and_memory_shows_the_residents(http, server):
    http.post("/sdapi/v1/txt2img", json=SMALL).raise_for_status()  # a model is loaded
    assert set_options(http, memory_policy="low", memory_gpu_weights=0).status_code == 200
    http.post("/sdapi/v1/txt2img", json=SMALL).raise_for_status()
    policy = http.get("/sdapi/v1/memory").json()["policy"]
    assert policy["mode"] == "low" and policy["gpu_weights_gib"] == 0 and policy["budget_bytes"] == 0
    assert set(policy["components"]) == {"clip_l", "unet", "vae"}
    unet = policy["components"]["unet"]
    assert unet["units"] > 5 and unet["resident_bytes"] < unet["bytes"]
    largest = max(u.nbytes for u in server.context.app.engine.placement.units())
    assert 0 < policy["peak_resident_bytes"] <= largest  # one block at a time
    saved = json.loads((server.context.app.settings.data_dir / "config.json").read_text())
    assert saved["memory_policy"] == "low"

    assert set_options(http, memory_policy="normal", memory_gpu_weights=-1, memory_keep_free=0).status_code == 200
    http.post("/sdapi/v1/txt2img", json=SMALL).raise_for_status()
    policy = http.get("/sdapi/v1/memory").json()["policy"]
    assert policy["mode"] == "normal" and policy["budget_bytes"] is None  # no CUDA: no free-memory limit
    assert all(c["resident_bytes"] == c["bytes"] for c in policy["components"].values())
    assert set_options(http, memory_policy="none").status_code == 200
    assert http.get("/sdapi/v1/memory").json()["policy"]["components"] == {}


@pytest.mark.parametrize("changes, named", [
    ({"memory_policy": "tiny"}, "memory_policy"),
    ({"memory_gpu_weights": "lots"}, "memory_gpu_weights"),
    ({"memory_keep_free": -2}, "memory_keep_free"),
    ({"memory_t5_after_encoding": "gpu"}, "memory_t5_after_encoding"),
])
def test_bad_values_are_refused_by_name_and_change_nothing(http, changes, named):
    before = http.get("/sdapi/v1/memory").json()["policy"]["mode"]
    response = set_options(http, **changes)
    assert response.status_code == 422
    assert named in response.text
    assert http.get("/sdapi/v1/memory").json()["policy"]["mode"] == before
    assert http.get("/sdapi/v1/options").json()[named] != list(changes.values())[0]


def test_a_flag_wins_over_the_saved_option(tmp_path, tiny_checkpoints):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.json").write_text(json.dumps({"memory_policy": "normal"}))
    srv = start_server(tmp_path, {"tiny-sd1": tiny_checkpoints["sd1"]}, settings={"vram": "lowvram"})
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            body = http.get("/sdapi/v1/memory").json()["policy"]
            options = http.get("/sdapi/v1/options").json()
    finally:
        srv.stop()
    assert body["mode"] == "low" and body["gpu_weights_gib"] == 0  # --lowvram
    assert options["memory_policy"] == "low" and options["memory_gpu_weights"] == 0


FROZEN = {"compile": True, "compile_freeze": True}


@pytest.fixture(scope="module")
def frozen_server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("memory-frozen"), {"tiny-sd1": tiny_checkpoints["sd1"]},
                       settings=FROZEN)
    srv.context.app.engine.manage_on_cpu = True  # as if the CPU were a GPU: a managing policy moves weights
    yield srv
    srv.stop()


def test_a_policy_that_moves_weights_is_refused_under_compile_freeze(frozen_server):
    with httpx.Client(base_url=frozen_server.url, timeout=60) as http:
        response = set_options(http, memory_policy="low", memory_gpu_weights=0)
        assert response.status_code == 422
        assert "memory_policy" in response.text and "--compile-freeze" in response.text
        assert http.get("/sdapi/v1/options").json()["memory_policy"] == "none"
        assert http.get("/sdapi/v1/memory").json()["policy"]["mode"] == "none"
        assert set_options(http, memory_keep_free=3).status_code == 200  # a change that moves nothing is kept
        assert http.get("/sdapi/v1/options").json()["memory_keep_free"] == 3
    saved = json.loads((frozen_server.context.app.settings.data_dir / "config.json").read_text())
    assert saved["memory_policy"] == "none"


def test_a_saved_policy_that_moves_weights_is_not_applied_under_compile_freeze(tmp_path, tiny_checkpoints):
    from modules.app import build_app
    from modules.server.config import ServerConfig
    from modules.server.context import build_context
    from modules.server.memory import start_memory_policy
    from modules.settings import Settings

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.json").write_text(json.dumps({"memory_policy": "low"}))
    app = build_app(Settings(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs",
                             data_dir=tmp_path / "data", device="cpu", precision="fp32", **FROZEN))
    app.engine.manage_on_cpu = True
    ctx = build_context(app, ServerConfig(api=True, nowebui=True))
    start_memory_policy(ctx)
    assert ctx.options.get("memory_policy") == "none"
    assert app.engine.placement.policy.mode == "none"
    assert json.loads((tmp_path / "data" / "config.json").read_text())["memory_policy"] == "none"
