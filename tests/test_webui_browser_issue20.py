"""Browser tests for the rest of issue 20 (the web UI as an A1111 user meets it): sizes typed while the
model loads are never overwritten, the variation seed controls reach the job, every main control has a
tooltip, and user data (styles) lands in the data directory, which git ignores.

One server (the bundled demo model and a tiny SD1 checkpoint) and one browser for the module.
"""
from __future__ import annotations

import base64
import io
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from modules.demo import DEMO_CHECKPOINT
from tests import test_webui_browser as base
from tests.test_webui_browser import gallery_image, set_number, set_number_settled, wait_result
from tests.ui_helpers import (
    act_as_the_update_arrives,
    guarded_page,
    open_img2img_mode,
    press_slider,
    require_browser,
    start_ui_server,
    wait_all_applied,
)

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server
REPO = Path(__file__).resolve().parent.parent
APPLIED = "document.body.dataset.nativeSize === 'applied'"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    if not DEMO_CHECKPOINT.exists():
        pytest.skip("the bundled demo checkpoint is missing")
    running = start_ui_server(tmp_path_factory.mktemp("webui-issue20"),
                              {"tiny": tiny_checkpoints["sd1"], "demo": DEMO_CHECKPOINT})
    yield running
    running.stop()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url, 1280, 720) as page:
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        page.wait_for_function(APPLIED, timeout=120_000)
        yield page


def number(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def busy_worker(http: httpx.Client) -> str:
    """A long job on the worker: the page's model load (and so its native size) waits behind it."""
    params = {"prompt": "busy", "width": 64, "height": 64, "steps": 150, "n_iter": 50, "seed": 1,
              "sampler_name": "Euler"}
    job = http.post("/api/v1/jobs", json={"kind": "txt2img", "params": params})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 60
    while http.get(f"/api/v1/jobs/{job_id}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the busy job never started"
        time.sleep(0.1)
    return job_id


def test_sizes_typed_while_the_model_loads_are_kept(browser, server):
    """The native size arrives after the user typed a width on txt2img (not yet entered) and as the user moves
    img2img's height with the keyboard: the page's round trips (if it makes any to apply the size) are held
    until the user has moved it, so the change lands between the apply step reading the sizes and writing
    them back. Both tabs keep the user's sizes; img2img's width is the model's 128 (applied before the user
    moved the height). A later checkpoint switch moves neither tab."""
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            guarded_page(browser, server.url, 1280, 720) as page:
        job_id = busy_worker(http)
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        page.wait_for_function("document.body.dataset.nativeSize === 'pending'", timeout=30_000)
        page.locator("#txt2img-width input[type=number]").fill("192")  # typed, not yet entered
        page.get_by_role("tab", name="img2img", exact=True).click()
        page.wait_for_selector("#img2img-height input[type=range]", timeout=30_000)
        assert page.evaluate(f"!({APPLIED})"), "the native size came before the user typed"
        moved = act_as_the_update_arrives(page, lambda: http.delete(f"/api/v1/jobs/{job_id}"), APPLIED,
                                          lambda: press_slider(page, "img2img-height"))
        wait_all_applied(page, APPLIED)
        assert (number(page, "img2img-width"), number(page, "img2img-height")) == ("128", moved)
        page.get_by_role("tab", name="txt2img", exact=True).click()
        assert (number(page, "txt2img-width"), number(page, "txt2img-height")) == ("192", "512")
        page.locator("#checkpoint input").click()
        page.get_by_role("option", name="tiny").click()  # SD1: 512, which no tab takes now
        page.wait_for_function(APPLIED, timeout=120_000)
        wait_all_applied(page, APPLIED)
        assert (number(page, "txt2img-width"), number(page, "txt2img-height")) == ("192", "512")
        page.get_by_role("tab", name="img2img", exact=True).click()
        assert (number(page, "img2img-width"), number(page, "img2img-height")) == ("128", moved)


def api_image(server, **params) -> Image.Image:
    job = {"prompt": "a red circle", "negative_prompt": "", "width": 64, "height": 64, "steps": 3, "seed": 1234,
           "cfg_scale": 7, "sampler_name": "DPM++ 2M", "scheduler": "Automatic", **params}
    response = httpx.post(server.url + "/sdapi/v1/txt2img", json=job, timeout=300)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB")


def test_variation_seed_and_resize_seed_from_reach_the_job(page, server):
    """A1111's seed extras: variation seed and strength, and "resize seed from"; the UI's image is the API's
    for the same fields, and not the image without them."""
    page.fill("#txt2img-prompt textarea", "a red circle")
    for elem, value in (("txt2img-width", 64), ("txt2img-height", 64), ("txt2img-steps", 3)):
        set_number(page, elem, value)
    page.locator("#txt2img-seed input").fill("1234")
    page.get_by_text("Variation seed", exact=True).first.click()  # the accordion
    # its controls re-render on the first open and can drop a value typed meanwhile: set each until it stays
    for elem, value in (("txt2img-subseed", 77), ("txt2img-subseed-strength", 0.5), ("txt2img-seed-resize-w", 96),
                        ("txt2img-seed-resize-h", 80)):
        set_number_settled(page, elem, value)
    page.click("#txt2img-generate")
    info = wait_result(page)
    for part in ("Seed: 1234", "Variation seed: 77", "Variation seed strength: 0.5", "Seed resize from: 96x80"):
        assert part in info, info
    shown = np.asarray(gallery_image(page, server, "txt2img"), dtype=np.int16)
    varied = np.asarray(api_image(server, subseed=77, subseed_strength=0.5, seed_resize_from_w=96,
                                  seed_resize_from_h=80), dtype=np.int16)
    plain = np.asarray(api_image(server), dtype=np.int16)
    assert np.abs(shown - varied).max() <= 1
    assert np.abs(shown - plain).mean() > 2, "the variation fields changed nothing"


MAIN_CONTROLS = {  # tab -> id suffixes of the controls the issue names, each with a tooltip
    "txt2img": ("sampler", "scheduler", "steps", "cfg-scale", "seed", "subseed", "subseed-strength",
                "seed-resize-w", "width", "height", "n-iter", "batch-size", "tiling", "hr-upscaler",
                "hr-steps", "hr-denoising", "hr-scale", "refiner-checkpoint", "refiner-switch-at"),
    "img2img": ("sampler", "steps", "cfg-scale", "seed", "denoising", "resize-mode", "mask-blur",
                "inpainting-mask-invert", "inpainting-fill", "inpaint-area", "inpaint-padding"),
}


def test_every_main_control_has_a_tooltip(page):
    """Sampler, schedule, steps, CFG, seed, denoise, hires and mask options (the issue's list) and the other
    main controls carry a tooltip; A1111's wording where it has one."""
    page.locator("#txt2img-hires").click()  # accordions render their controls once opened
    page.locator("#txt2img-refiner").click()
    page.get_by_text("Variation seed", exact=True).first.click()
    page.get_by_role("tab", name="img2img", exact=True).click()
    open_img2img_mode(page, "Inpaint")
    page.locator("#img2img-inpaint-options").click()
    ids = [f"{tab}-{suffix}" for tab, suffixes in MAIN_CONTROLS.items() for suffix in suffixes]
    try:
        page.wait_for_function("ids => ids.every(id => document.getElementById(id)?.title?.trim())", arg=ids,
                               timeout=10_000)
    except PlaywrightTimeout:
        pass  # the assertion below names the controls without one
    titles = page.evaluate("ids => ids.map(id => document.getElementById(id)?.title || '')", ids)
    shown = dict(zip(ids, titles, strict=True))
    assert not [i for i, title in shown.items() if not title.strip()], shown
    assert page.locator("#img2img-mask-blur").get_attribute("title") == \
        "How much to blur the mask before processing, in pixels."  # A1111's wording
    assert page.locator("#txt2img-hr-steps").get_attribute("title").startswith("Number of sampling steps")
    assert page.locator("#txt2img-sampler").get_attribute("title") == "Which algorithm to use to produce the image"


def test_styles_are_saved_under_the_data_dir(page, server):
    """User data goes under the data directory (git-ignored), never the repository root."""
    before = (REPO / "styles.csv").exists()
    page.fill("#txt2img-prompt textarea", "{prompt}, oil painting")
    page.click("#txt2img-save-style-box")
    page.locator("#txt2img-style-name input").fill("issue20 oil")
    page.locator("#txt2img-save-style").click()
    page.locator("[data-testid=toast-body]", has_text="Saved style").first.wait_for(timeout=15_000)
    styles = server.context.app.settings.styles_file
    assert styles == server.context.data_dir / "styles.csv", styles
    assert "issue20 oil,\"{prompt}, oil painting\"" in styles.read_text()
    assert (REPO / "styles.csv").exists() == before  # nothing new in the repository root
    for default in ("data/styles.csv", "data/config.json", "outputs/txt2img-images/x.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", default], cwd=REPO)
        assert ignored.returncode == 0, f"git does not ignore {default}"
