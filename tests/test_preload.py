"""The default checkpoint loads on the worker right after start (A1111 loads it at launch), so the
first image does not wait for it; --lazy-load leaves it to the first job."""
from __future__ import annotations

import threading
import time

import httpx

from tests.api_server import start_server


def loaded_after_start(tmp_path, checkpoint, **config) -> str | None:
    srv = start_server(tmp_path, {"tiny": checkpoint}, **config)
    try:
        preloads = [t for t in threading.enumerate() if t.name == "atelier-preload"]
        assert len(preloads) <= 1
        for thread in preloads:
            thread.join(60)
        assert httpx.get(srv.url + "/api/v1/health", timeout=30).status_code == 200
        return srv.context.executor.loaded_model()
    finally:
        srv.stop()


def test_the_default_checkpoint_is_loaded_without_a_job(tmp_path, tiny_checkpoints):
    assert loaded_after_start(tmp_path, tiny_checkpoints["sd1"]) == "tiny"


def test_lazy_load_waits_for_the_first_job(tmp_path, tiny_checkpoints):
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, preload_model=False)
    try:
        time.sleep(1.0)  # time in which a preload would have started
        assert srv.context.executor.loaded_model() is None
        job = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "sampler_name": "Euler"}
        assert httpx.post(srv.url + "/sdapi/v1/txt2img", json=job, timeout=120).status_code == 200
        assert srv.context.executor.loaded_model() == "tiny"
    finally:
        srv.stop()


def test_a_broken_default_checkpoint_leaves_the_server_up(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert loaded_after_start(tmp_path, broken) is None
