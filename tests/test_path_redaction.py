"""Under --listen, API clients see model names relative to the models folder, not server paths
(issue 23, item 5). Real HTTP against the real server, with a corrupt checkpoint."""
from __future__ import annotations

import httpx

from modules.server.redact import path_replacements, redact
from modules.settings import Settings
from tests.api_server import start_server

ROOT = ("root", "r-pass")


def _broken_server(tmp_path, tiny, **config):
    srv = start_server(tmp_path, {"tiny": tiny}, api_auth=(ROOT,), admin_users=("root",), **config)
    (srv.context.app.settings.models_dir / "Stable-diffusion" / "broken.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    return srv


def _errors(srv) -> list[str]:
    c = httpx.Client(base_url=srv.url, auth=ROOT, timeout=120)
    switched = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
    assert switched.status_code == 422, switched.text
    job = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                            "override_settings": {"sd_model_checkpoint": "broken"}})
    assert job.status_code == 500, job.text
    job_id = job.json()["job_id"]
    unknown = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    return [switched.text, job.text, c.get(f"/api/v1/jobs/{job_id}").text, unknown.text,
            c.get("/sdapi/v1/sd-models").text]


def test_listen_shows_names_relative_to_the_models_folder(tmp_path, tiny_checkpoints):
    srv = _broken_server(tmp_path, tiny_checkpoints["sd1"], listen=True)
    try:
        texts = _errors(srv)
    finally:
        srv.stop()
    models = srv.context.app.settings.models_dir
    for text in texts:
        assert str(models) not in text and str(models.resolve()) not in text and str(tmp_path) not in text, text
    assert "Stable-diffusion/broken.safetensors" in texts[0] and "broken" in texts[1]


def test_loopback_keeps_full_paths(tmp_path, tiny_checkpoints):
    """The control: the same errors on loopback do name the path (so the test above can fail)."""
    srv = _broken_server(tmp_path, tiny_checkpoints["sd1"])
    try:
        texts = _errors(srv)
    finally:
        srv.stop()
    assert str(srv.context.app.settings.models_dir.resolve()) in texts[0] + texts[4]


def test_replacements(tmp_path):
    settings = Settings(models_dir=tmp_path / "m", data_dir=tmp_path / "d", lora_dirs=(tmp_path / "big" / "loras",))
    pairs = path_replacements(settings)
    body = f"{tmp_path}/m/Stable-diffusion/x.ckpt; {tmp_path}/big/loras/a.safetensors; {tmp_path}/d/jobs; {tmp_path}/m"
    assert redact(body.encode(), pairs).decode() == "Stable-diffusion/x.ckpt; loras/a.safetensors; data/jobs; models"
