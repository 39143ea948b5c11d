"""The X/Y/Z axes added with the refiner: Refiner checkpoint / switch at, VAE, UniPC Order, Extra noise and
Distilled CFG Scale, over real HTTP with A1111 1.10's positional `script_args`; bad values are a 422 naming the
value, and nothing is queued."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.api_server import start_server
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint
from tests.test_scripts_api import fields_of, init_image, job_count, post, xyz_args

# A1111 1.10's txt2img axis list: 35 Refiner checkpoint, 36 Refiner switch at, 27 VAE, 29 UniPC Order
REFINER_CHECKPOINT, REFINER_SWITCH_AT, VAE, UNIPC_ORDER = 35, 36, 27, 29
STEPS4 = dict(steps=4, seed=3)


@pytest.fixture(scope="module")
def http(tmp_path_factory, tiny_checkpoints):
    import httpx

    root = tmp_path_factory.mktemp("xyz-extra")
    ref = make_tiny_checkpoint("sd1", root / "src" / "zref.safetensors", seed=1)
    donor = load_file(make_tiny_checkpoint("sd1", root / "src" / "donor.safetensors", seed=5))
    (root / "models" / "VAE").mkdir(parents=True)
    save_file({k: v for k, v in donor.items() if k.startswith("first_stage_model.")},
              root / "models" / "VAE" / "other.safetensors")
    server = start_server(root, {"base": tiny_checkpoints["sd1"], "zref": ref})
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
    server.stop()


def test_a1111_axis_indexes():
    from importlib import import_module

    axes = import_module("extensions.xyz-grid.axes").A1111_AXES["txt2img"]
    assert [axes[i] for i in (REFINER_CHECKPOINT, REFINER_SWITCH_AT, VAE, UNIPC_ORDER)] == [
        "Refiner checkpoint", "Refiner switch at", "VAE", "UniPC Order"]


def test_refiner_axes_positional(http):
    args = xyz_args(REFINER_CHECKPOINT, "None, zref", REFINER_SWITCH_AT, "0.5, 1")
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot", script_args=args, **STEPS4)
    cells = fields_of(info["infotexts"][1:])
    assert len(images) == 5 and len(cells) == 4
    refined = [(f.get("Refiner", ""), f.get("Refiner switch at")) for f in cells]
    assert refined[0] == ("", None) and refined[2] == ("", None) and refined[3] == ("", None)
    assert refined[1][0].startswith("zref [") and refined[1][1] == 0.5
    assert np.asarray(images[1]).tolist() != np.asarray(images[2]).tolist()  # the refiner changed that cell


def test_vae_axis_switches_and_the_next_job_gets_the_servers_vae_back(http):
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot",
                        script_args=xyz_args(VAE, "None, other.safetensors"), **STEPS4)
    cells = fields_of(info["infotexts"][1:])
    assert "VAE" not in cells[0] and cells[1]["VAE"] == "other.safetensors" and len(cells[1]["VAE hash"]) == 10
    assert np.asarray(images[1]).tolist() != np.asarray(images[2]).tolist()
    _, plain = post(http, "txt2img", prompt="a fox", **STEPS4)
    assert "VAE" not in fields_of(plain["infotexts"])[0]


def test_unipc_order_axis(http):
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot", sampler_name="UniPC",
                        script_args=xyz_args(UNIPC_ORDER, "1, 3"), **STEPS4)
    assert len(images) == 3
    assert np.asarray(images[1]).tolist() != np.asarray(images[2]).tolist()


def test_extra_noise_axis_img2img(http):
    images, info = post(http, "img2img", prompt="a fox", init_images=[init_image()], denoising_strength=0.5,
                        script_name="X/Y/Z plot", script_args={"x_type": "Extra noise", "x_values": "0, 0.5",
                                                               "include_lone_images": True}, **STEPS4)
    cells = fields_of(info["infotexts"][1:])
    assert "Extra noise" not in cells[0] and cells[1]["Extra noise"] == 0.5
    assert np.asarray(images[1]).tolist() != np.asarray(images[2]).tolist()


def test_distilled_cfg_axis_is_a_no_op_on_sd_models(http):
    """As in Forge, the guidance embedding only exists in FLUX.1-dev; other models ignore the value."""
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot",
                        script_args={"x_type": "Distilled CFG Scale", "x_values": "1, 6",
                                     "include_lone_images": True}, **STEPS4)
    assert len(images) == 3 and np.asarray(images[1]).tolist() == np.asarray(images[2]).tolist()


@pytest.mark.parametrize("args, words", [
    (xyz_args(REFINER_CHECKPOINT, "zref, missing-refiner"), ["missing-refiner"]),
    (xyz_args(REFINER_SWITCH_AT, "0.5, 2"), ["Refiner switch at", "value 2.0"]),
    (xyz_args(VAE, "Automatic, nope.safetensors"), ["'nope.safetensors'", "VAE", "other.safetensors"]),
    (xyz_args(UNIPC_ORDER, "2, 5"), ["UniPC Order 5"]),
    ({"x_type": "Extra noise", "x_values": "0.1, 2"}, ["Extra noise 2.0"]),
])
def test_bad_values_are_a_422_naming_the_value_and_nothing_is_queued(http, args, words):
    before = job_count(http)
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 1,
                                                    "script_name": "X/Y/Z plot", "script_args": args})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "script_args"]
    assert all(w in detail["msg"] for w in words), detail["msg"]
    assert job_count(http) == before


def test_fill_values_per_axis_kind(tmp_path, tiny_checkpoints):
    """What the UI's fill buttons write: every choice of a list axis, checkpoints for checkpoint axes
    ("None" first for the refiner), the VAE folder's files; nothing for number and text axes."""
    import importlib

    from modules.plugins import api
    from tests.plugin_helpers import BUNDLED, ext_app

    (tmp_path / "models" / "VAE").mkdir(parents=True)
    (tmp_path / "models" / "VAE" / "my-vae.safetensors").write_bytes(b"")
    app = ext_app(tmp_path, dirs=(BUNDLED,))
    plot = importlib.import_module("atelier_ext_xyz_grid.plot")  # loaded by the app's extension loader

    def fill(axis: str, letter: str = "x", task: str = "txt2img") -> str | None:
        return plot.fill_values(api.ScriptFill(task, f"{letter}_values", {f"{letter}_type": axis},
                                               app.registries, ("base", "zref")))

    assert "Euler a" in fill("Sampler") and "Karras" in fill("Schedule type", "y")
    assert fill("Checkpoint name") == "base,zref" and fill("Refiner checkpoint", "z") == "None,base,zref"
    assert fill("VAE") == "Automatic,None,my-vae.safetensors"
    assert fill("Steps") is None and fill("Prompt S/R") is None and fill("Nothing") is None
    assert fill("no such axis") is None
