"""Browser test: steps and CFG follow the checkpoint's family (FLUX.1-schnell: 4 steps, CFG 1) until the user
sets them. Debian chromium + playwright against the real server on 127.0.0.1."""
from __future__ import annotations

import pytest

from modules.pipeline.params import Txt2ImgParams
from tests.fixtures.make_tiny_mmdit import make_all_in_one
from tests.test_webui_browser_a1111 import choose_checkpoint
from tests.ui_helpers import external_request_guard, launch_browser, require_browser, start_ui_server

pytestmark = pytest.mark.slow


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def wait_value(page, elem_id: str, wanted: float) -> None:
    page.wait_for_function("([id, v]) => Number(document.querySelector(`#${id} input[type=number]`)?.value) === v",
                           arg=[elem_id, wanted], timeout=180_000)


def test_steps_and_cfg_follow_the_family_until_the_user_sets_them(tmp_path, tiny_checkpoints) -> None:
    from playwright.sync_api import sync_playwright

    require_browser()
    schnell = make_all_in_one("flux-schnell", tmp_path / "schnell.safetensors")
    server = start_ui_server(tmp_path / "ui", {"tiny-sd": tiny_checkpoints["sd1"], "tiny-schnell": schnell})
    try:
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            outside: list[str] = []
            external_request_guard(page, outside, server.url)
            page.goto(server.url)
            page.wait_for_selector("#txt2img-generate", timeout=60_000)
            built = Txt2ImgParams(prompt="")  # what an SD model shows: the page's built values
            wait_value(page, "txt2img-steps", 4)  # the page opens on the first checkpoint, FLUX.1-schnell
            wait_value(page, "txt2img-cfg-scale", 1.0)
            choose_checkpoint(page, "tiny-sd")  # back to SD: the values the page was built with
            wait_value(page, "txt2img-steps", built.steps)
            wait_value(page, "txt2img-cfg-scale", built.cfg_scale)
            box = page.locator("#txt2img-steps input[type=number]")
            box.fill("9")
            box.press("Enter")
            choose_checkpoint(page, "tiny-schnell")  # the untouched fields follow the family, the user's steps stay
            wait_value(page, "txt2img-cfg-scale", 1.0)
            assert value(page, "txt2img-steps") == "9"
            browser.close()
            assert not outside, outside
    finally:
        server.stop()
