"""Golden A1111 responses: fixed-seed jobs answer exactly as recorded in tests/golden/.

`parameters`, `info` (less the job id and timestamp) and every infotext must match byte for
byte; images must match the recorded PNGs pixel for pixel (within 1/255, for other CPUs).
Regenerate with ATELIER_WRITE_GOLDEN=1 only for a deliberate change of output.
"""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api_server import start_server

GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("ATELIER_WRITE_GOLDEN") == "1"
VARYING_INFO = ("job_id", "job_timestamp")


def _png(color: str, size=(64, 64), box=None) -> str:
    image = Image.new("RGB", size, color)
    if box:
        image.paste("white", box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


BASE = dict(prompt="a (red:1.2) circle, [blue:green:0.5]", negative_prompt="blurry", width=64, height=64,
            steps=3, sampler_name="Euler a", seed=1234, subseed=99, subseed_strength=0.25, cfg_scale=6.5)
CASES = {
    "txt2img": ("txt2img", {**BASE, "batch_size": 2}),
    "txt2img-karras-clipskip": ("txt2img", {**BASE, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                                            "override_settings": {"CLIP_stop_at_last_layers": 2}}),
    "txt2img-hires": ("txt2img", {**BASE, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                                  "denoising_strength": 0.6, "hr_second_pass_steps": 2}),
    "img2img": ("img2img", {**BASE, "init_images": [_png("red")], "denoising_strength": 0.5}),
    "inpaint": ("img2img", {**BASE, "init_images": [_png("blue")], "mask": _png("black", box=(16, 16, 48, 48)),
                            "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("golden"), {"tiny-sd1": tiny_checkpoints["sd1"]})
    yield srv
    srv.stop()


def _normalised(response: dict) -> dict:
    info = json.loads(response["info"])
    for key in VARYING_INFO:
        info.pop(key)
    return {"parameters": response["parameters"], "info": info}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a1111_response_is_unchanged(server, case):
    route, body = CASES[case]
    response = httpx.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=300)
    assert response.status_code == 200, response.text
    data = response.json()
    text_path, image_paths = GOLDEN / f"{case}.json", [GOLDEN / f"{case}-{n}.png" for n in range(len(data["images"]))]
    got = json.dumps(_normalised(data), indent=1, sort_keys=True)
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        text_path.write_text(got + "\n", encoding="utf-8")
        for path, image in zip(image_paths, data["images"], strict=True):
            path.write_bytes(base64.b64decode(image))
    assert got + "\n" == text_path.read_text(encoding="utf-8")
    for path, image in zip(image_paths, data["images"], strict=True):
        with Image.open(path) as golden:
            assert Image.open(io.BytesIO(base64.b64decode(image))).info["parameters"] == golden.info["parameters"]
            expected = np.asarray(golden.convert("RGB"), dtype=np.int16)
        assert np.abs(_pixels(image) - expected).max() <= 1, f"{path.name}: pixels changed"
