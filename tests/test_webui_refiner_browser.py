"""Browser test of the Refiner accordion (issue 20): choose a refiner, generate, and the infotext names it;
Send to img2img restores it, and pasting an infotext without a refiner turns it off (as A1111 pastes)."""
from __future__ import annotations

import re
import time

import pytest

from tests import test_webui_browser as base
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint
from tests.test_webui_browser import fill_txt2img, open_ui, set_number_settled, wait_result
from tests.ui_helpers import guarded_page, require_browser, start_ui_server

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-refiner")
    other = make_tiny_checkpoint("sd1", root / "src" / "other.safetensors", seed=1)
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"], "zrefiner": other})
    yield running
    running.stop()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url) as page:
        open_ui(page, server.url)
        yield page


def dropdown_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").input_value()


def wait_value(page, elem_id: str, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = dropdown_value(page, elem_id)
        if re.search(pattern, value):
            return value
        time.sleep(0.2)
    raise TimeoutError(f"#{elem_id} shows {dropdown_value(page, elem_id)!r}, not {pattern!r}")


def test_refiner_accordion_generates_and_is_restored(page):
    fill_txt2img(page, "a red circle", seed=7, steps=4)
    page.locator("#txt2img-refiner").get_by_text("Refiner").first.click()
    page.wait_for_function("document.querySelector('#txt2img-refiner-refresh')?.getAttribute('aria-label') "
                           "=== 'Refresh the refiner checkpoint list'", timeout=10_000)  # an SVG icon button
    page.locator("#txt2img-refiner-checkpoint input").click()
    page.get_by_role("option", name=re.compile(r"^zrefiner")).click()
    set_number_settled(page, "txt2img-refiner-switch-at", 0.5)
    page.click("#txt2img-generate")
    info = wait_result(page)
    assert re.search(r"Refiner: zrefiner \[[0-9a-f]{10}\], Refiner switch at: 0\.5", info), info

    page.click("#txt2img-send-to-img2img")
    page.locator("#img2img-refiner").get_by_text("Refiner").first.click()
    wait_value(page, "img2img-refiner-checkpoint", r"^zrefiner")
    assert page.locator("#img2img-refiner-switch-at input[type=number]").input_value() == "0.5"

    page.get_by_role("tab", name="txt2img", exact=True).first.click()
    page.fill("#txt2img-prompt textarea", "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64")
    page.click("#txt2img-read-params")
    wait_value(page, "txt2img-refiner-checkpoint", r"^None$")
