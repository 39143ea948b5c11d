"""The added samplers through the engine on the tiny SD1 checkpoint, over real HTTP (/sdapi/v1)."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from modules import infotext
from tests.api_server import start_server

NEW = ["DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "PLMS", "Euler CFG++", "DPM++ 2M CFG++", "DEIS",
       "iPNDM", "Res Multistep", "TCD", "SA-Solver", "ER-SDE"]


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_sd1):
    server = start_server(tmp_path_factory.mktemp("samplers"), {"tiny-sd1": tiny_sd1})
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
    server.stop()


def txt2img(http, **kw) -> tuple[list[np.ndarray], list[str]]:
    body = {**dict(prompt="a red circle", negative_prompt="blue", width=64, height=64, steps=4, seed=42,
                   cfg_scale=3.0), **kw}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))), dtype=np.int16) for i in data["images"]]
    return images, json.loads(data["info"])["infotexts"]


def test_samplers_list_has_the_new_names_and_aliases(http):
    listed = {s["name"]: s["aliases"] for s in http.get("/sdapi/v1/samplers").json()}
    assert set(NEW) <= set(listed)
    assert listed["DPM fast"] == ["k_dpm_fast", "dpm_fast"] and listed["Restart"] == ["restart"]
    assert "dpmpp_2m_sde_gpu" in listed["DPM++ 2M SDE"]


@pytest.mark.parametrize("name", NEW)
def test_new_sampler_generates_and_round_trips_infotext(http, name):
    images, infotexts = txt2img(http, sampler_name=name)
    assert images[0].shape[:2] == (64, 64) and images[0].std() > 0
    fields = infotext.parse(infotexts[0])
    assert fields["Sampler"] == name
    again, _ = txt2img(http, sampler_name=fields["Sampler"], seed=int(fields["Seed"]), steps=int(fields["Steps"]))
    assert np.array_equal(again[0], images[0])  # noisy ones too: every draw is seeded per image


def test_alias_selects_the_sampler(http):
    by_alias, infotexts = txt2img(http, sampler_name="dpm_fast")
    assert infotext.parse(infotexts[0])["Sampler"] == "DPM fast"
    by_name, _ = txt2img(http, sampler_name="DPM fast")
    assert np.array_equal(by_alias[0], by_name[0])


def test_brownian_sde_noise_is_per_image_and_batch_independent(http):
    """A1111's Brownian trees are seeded per image: image 2 of a batch equals its seed run alone."""
    batch, infotexts = txt2img(http, sampler_name="DPM++ 2M SDE", batch_size=2)
    alone, _ = txt2img(http, sampler_name="DPM++ 2M SDE", seed=43)
    assert infotext.parse(infotexts[1])["Seed"] == "43"
    assert np.abs(batch[1] - alone[0]).max() <= 2
    assert np.abs(batch[0] - batch[1]).max() > 10
