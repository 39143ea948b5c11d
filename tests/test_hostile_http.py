"""Hostile inputs over real HTTP against the real server (issue 23, item 6): traversal through
network preview/metadata routes, checkpoint names and <lora:../..>; pickle payloads in .ckpt/.pt;
safetensors with huge headers; a 20000x20000 PNG bomb; the n_iter cap."""
from __future__ import annotations

import base64
import struct
import time
import zlib

import httpx
import pytest
import torch

from tests.api_server import start_server

SMALL = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "sampler_name": "Euler", "seed": 2}
TRAVERSALS = ("../../secret", "../../../etc/passwd", "/etc/passwd", "..\\..\\secret", "sub/../../secret",
              "%2e%2e/%2e%2e/secret")
MARKER_NAME = "pwned-by-pickle"


class Payload:
    """Unpickling this runs `open(marker, 'w')`: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("hostile")
    srv = start_server(root, {"tiny": tiny_checkpoints["sd1"]})
    models = srv.context.app.settings.models_dir
    (models.parent / "secret.safetensors").write_bytes(b"not for the web")
    (models.parent / "secret.preview.png").write_bytes(b"\x89PNG secret")
    marker = str(root / MARKER_NAME)
    torch.save({"state_dict": Payload(marker)}, models / "Stable-diffusion" / "evil.ckpt")
    (models / "embeddings").mkdir(exist_ok=True)
    torch.save({"string_to_param": {"*": Payload(marker)}}, models / "embeddings" / "evil.pt")
    huge = struct.pack("<Q", 1 << 62) + b"{}"
    (models / "Stable-diffusion" / "huge.safetensors").write_bytes(huge)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_network_routes_refuse_traversal(http):
    for kind in ("lora", "embedding", "../lora"):
        for name in TRAVERSALS:
            for route in ("/ext/lora/preview", "/ext/lora/metadata"):
                response = http.get(route, params={"kind": kind, "name": name})
                assert 400 <= response.status_code < 500, (route, kind, name, response.status_code)
                assert b"not for the web" not in response.content and b"PNG secret" not in response.content


def test_checkpoint_names_refuse_traversal(http):
    for name in (*TRAVERSALS, "../secret.safetensors"):
        switched = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert switched.status_code == 422 and "Checkpoint not found" in switched.text, name
        job = http.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}})
        assert job.status_code == 422, name


def test_lora_tags_cannot_leave_the_lora_folders(http):
    for name in TRAVERSALS[:4]:
        response = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": f"a cat <lora:{name}:1>"})
        assert response.status_code in (200, 422), response.text
        if response.status_code == 200:
            info = response.json()["info"]
            assert "Lora hashes" not in info and "not for the web" not in info


def test_pickle_payloads_are_refused_without_running(server, http):
    refused = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "evil"})
    assert refused.status_code == 422, refused.text
    http.get("/sdapi/v1/embeddings")
    done = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "evil"})
    assert done.status_code == 200, done.text
    assert not list(server.context.app.settings.models_dir.parent.glob(MARKER_NAME))


def test_huge_safetensors_header_is_a_clear_error(http):
    start = time.monotonic()
    response = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "huge"})
    assert response.status_code == 422 and "huge.safetensors" in response.text, response.text
    assert time.monotonic() - start < 10
    assert http.get("/api/v1/health").status_code == 200


def _png_bomb(side: int = 20000) -> bytes:
    """A valid 8-bit grayscale PNG of side x side pixels, a few hundred KB, written without Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_png_bomb_is_refused(http):
    bomb = base64.b64encode(_png_bomb()).decode()
    assert struct.unpack(">II", base64.b64decode(bomb)[16:24]) == (20000, 20000)
    start = time.monotonic()
    img2img = http.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [bomb]})
    info = http.post("/sdapi/v1/png-info", json={"image": bomb})
    assert time.monotonic() - start < 20
    for response, loc in ((img2img, ["body", "init_images", 0]), (info, ["body", "image"])):
        assert response.status_code == 422, (response.status_code, response.text[:300])
        assert response.json()["detail"][0]["loc"] == loc
        assert "decompression bomb" in response.json()["detail"][0]["msg"]
    assert http.get("/api/v1/health").status_code == 200


@pytest.mark.parametrize("payload, field", [({"n_iter": 10001}, "n_iter"), ({"batch_size": 65}, "batch_size"),
                                            ({"steps": 1001}, "steps")])
def test_caps_stand_on_every_api(http, payload, field):
    a1111 = http.post("/sdapi/v1/txt2img", json={**SMALL, **payload})
    assert a1111.status_code == 422 and a1111.json()["detail"][0]["loc"] == ["body", field], a1111.text
    jobs = http.post("/api/v1/jobs", json={"kind": "txt2img", "params": {**SMALL, **payload}})
    assert jobs.status_code == 422 and field in jobs.text, jobs.text
