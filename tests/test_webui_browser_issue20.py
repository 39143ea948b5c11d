"""Browser tests for the rest of issue 20 (the web UI as an A1111 user meets it): sizes typed while the
model loads are never overwritten, the variation seed controls reach the job, every main control has a
tooltip, and user data (styles) lands in the data directory, which git ignores.

One server (the bundled demo model and a tiny SD1 checkpoint) and one browser for the module.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from modules.demo import DEMO_CHECKPOINT
from tests import test_webui_browser as base
from tests.ui_helpers import guarded_page, require_browser, start_ui_server

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
    """The native size arrives after the user typed: a width being typed (not yet entered) keeps its tab's
    sizes; the untouched tab gets the model's 128x128. A later checkpoint switch moves neither a tab
    the user set (here with the slider's arrow key) nor the typed one."""
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            guarded_page(browser, server.url, 1280, 720) as page:
        job_id = busy_worker(http)
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        page.wait_for_function("document.body.dataset.nativeSize === 'pending'", timeout=30_000)
        page.locator("#txt2img-width input[type=number]").fill("192")  # typed, not yet entered
        assert page.evaluate(f"!({APPLIED})"), "the native size came before the user typed"
        http.delete(f"/api/v1/jobs/{job_id}")
        page.wait_for_function(APPLIED, timeout=120_000)
        time.sleep(1.0)  # the page load's update and the checkpoint change's both ran; nothing else comes
        assert page.evaluate(APPLIED)
        assert (number(page, "txt2img-width"), number(page, "txt2img-height")) == ("192", "512")
        page.get_by_role("tab", name="img2img", exact=True).click()
        assert (number(page, "img2img-width"), number(page, "img2img-height")) == ("128", "128")
        page.locator("#img2img-height input[type=range]").focus()
        page.keyboard.press("ArrowRight")  # 128 -> 136 with the keyboard
        page.wait_for_function("document.querySelector('#img2img-height input[type=number]').value === '136'")
        page.locator("#checkpoint input").click()
        page.get_by_role("option", name="tiny").click()  # SD1: 512, which no tab takes now
        page.wait_for_function(APPLIED, timeout=120_000)
        time.sleep(0.5)
        page.wait_for_function(APPLIED, timeout=120_000)
        assert (number(page, "img2img-width"), number(page, "img2img-height")) == ("128", "136")
        page.get_by_role("tab", name="txt2img", exact=True).click()
        assert (number(page, "txt2img-width"), number(page, "txt2img-height")) == ("192", "512")
