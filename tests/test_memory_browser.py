"""The Settings tab's Memory section in a real browser: choosing a policy re-places the loaded model."""
from __future__ import annotations

import httpx
import pytest

from tests import test_webui_browser as base
from tests.ui_helpers import guarded_page, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    running = start_ui_server(tmp_path_factory.mktemp("memory-ui"), {"tiny": tiny_checkpoints["sd1"]})
    running.context.app.engine.manage_on_cpu = True  # the CPU is the only device here: manage it anyway
    yield running
    running.stop()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url, 1280, 900) as page:
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        yield page


def test_settings_memory_section_applies_the_policy(page, server):
    httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1},
               timeout=120).raise_for_status()  # a model is loaded
    page.get_by_role("tab", name="Settings", exact=True).click()
    section = page.locator("#settings-section-memory")
    section.wait_for()
    page.locator("#setting-memory_policy label", has_text="low").click()
    weights = page.locator("#setting-memory_gpu_weights input[type=number]")
    weights.fill("0")
    weights.press("Enter")
    page.click("#settings-save")
    page.wait_for_function("document.querySelector('#settings-message')?.innerText.includes('Saved')")
    page.screenshot(path=str(screenshot_dir() / "settings-memory.png"))
    policy = httpx.get(f"{server.url}/sdapi/v1/memory", timeout=30).json()["policy"]
    assert policy["mode"] == "low" and policy["gpu_weights_gib"] == 0
    assert set(policy["components"]) == {"clip_l", "unet", "vae"}  # the loaded model, re-placed

    page.locator("#setting-memory_keep_free input[type=number]").fill("-1")
    page.click("#settings-save")
    page.wait_for_function("document.querySelector('#settings-message')?.innerText.includes('Not saved')")
    assert "memory_keep_free" in page.locator("#settings-message").inner_text()
    assert server.context.options.get("memory_keep_free") == 2.0
