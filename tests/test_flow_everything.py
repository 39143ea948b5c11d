"""FLUX.1-dev with the rest of Atelier over real HTTP: X/Y/Z's Distilled CFG Scale axis, styles, wildcards and
batches (issue 15, "everything else works with them")."""
from __future__ import annotations

import numpy as np
import pytest

from tests.api_server import start_server
from tests.fixtures.make_tiny_mmdit import make_all_in_one
from tests.test_scripts_api import fields_of, post

FLUX = dict(steps=2, seed=3, width=64, height=64, sampler_name="Euler", cfg_scale=1.0)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    import httpx

    root = tmp_path_factory.mktemp("flow-everything")
    ckpt = make_all_in_one("flux-dev", root / "src" / "tiny-flux-dev.safetensors")
    styles = root / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nsnowy,{prompt} in the snow,blurry\n", encoding="utf-8")
    server = start_server(root, {"fluxdev": ckpt}, settings={"styles_file": styles})
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
    server.stop()


def test_distilled_cfg_axis_changes_the_flux_dev_image(http):
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot",
                        script_args={"x_type": "Distilled CFG Scale", "x_values": "1, 6", "include_lone_images": True},
                        **FLUX)
    cells = fields_of(info["infotexts"][1:])
    assert len(images) == 3 and [c["Distilled CFG Scale"] for c in cells] == [1, 6]
    assert np.asarray(images[1]).tolist() != np.asarray(images[2]).tolist()  # FLUX.1-dev's guidance embedding


def test_styles_wildcards_and_batches_on_flux(http):
    images, info = post(http, "txt2img", prompt="a __colors__ fox", styles=["snowy"], batch_size=2, **FLUX)
    fields = fields_of(info["infotexts"])
    assert len(images) == 2 and [f["Seed"] for f in fields] == [3, 4]
    for f in fields:
        assert "__" not in f["Prompt"] and f["Prompt"].endswith("fox in the snow") and f["Negative prompt"] == "blurry"
        assert f["Distilled CFG Scale"] == 3.5
    assert np.asarray(images[0]).tolist() != np.asarray(images[1]).tolist()


def test_steps_and_cfg_axes_win_over_the_family_defaults(http):
    """Fields the payload omits take FLUX.1-dev's defaults, unless an axis sets them."""
    _, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot",
                   script_args={"x_type": "Steps", "x_values": "1, 2", "y_type": "CFG Scale", "y_values": "1, 2",
                                "include_lone_images": True},
                   **{k: v for k, v in FLUX.items() if k not in ("steps", "cfg_scale")})
    cells = fields_of(info["infotexts"][1:])
    assert [(c["Steps"], c["CFG scale"]) for c in cells] == [(1, 1), (2, 1), (1, 2), (2, 2)]
