"""Browser test: steps, CFG, sampler and schedule follow the checkpoint's family (FLUX.1-schnell: 4 steps, CFG 1,
Euler / Simple) until the user sets them, even when the user sets them while the model is still loading.
Debian chromium + playwright against the real server on 127.0.0.1."""
from __future__ import annotations

import httpx
import pytest

from modules.pipeline.params import Txt2ImgParams
from tests.fixtures.make_tiny_mmdit import make_all_in_one
from tests.test_webui_browser_a1111 import choose_checkpoint
from tests.test_webui_browser_issue20 import busy_worker
from tests.ui_helpers import (
    act_as_the_update_arrives,
    guarded_page,
    launch_browser,
    press_slider,
    require_browser,
    start_ui_server,
    wait_all_applied,
)

pytestmark = pytest.mark.slow
APPLIED = "document.body.dataset.modelDefaults === 'applied'"


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def wait_value(page, elem_id: str, wanted: str) -> None:
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`)?.value === v",
                           arg=[elem_id, wanted], timeout=180_000)


def shown(page) -> dict[str, str]:
    """The followed fields' values on both tabs (a tab renders its fields when shown)."""
    out = {}
    for tab in ("img2img", "txt2img"):
        page.get_by_role("tab", name=tab, exact=True).click()
        page.wait_for_selector(f"#{tab}-steps input", timeout=30_000)
        out |= {f"{tab}-{name}": value(page, f"{tab}-{name}") for name in ("steps", "cfg-scale", "sampler",
                                                                           "scheduler")}
    return out


def test_values_set_while_the_model_loads_are_kept_and_the_rest_follow(tmp_path, tiny_checkpoints) -> None:
    """The presets arrive after the user typed steps (not yet entered) and as the user slides CFG: both stay;
    the untouched fields take FLUX.1-schnell's presets, go back to the page's built values on SD and follow
    again."""
    from playwright.sync_api import sync_playwright

    require_browser()
    schnell = make_all_in_one("flux-schnell", tmp_path / "schnell.safetensors")
    server = start_ui_server(tmp_path / "ui", {"tiny-sd": tiny_checkpoints["sd1"], "tiny-schnell": schnell})
    built = Txt2ImgParams(prompt="")  # what an SD model shows: the page's built values
    try:
        with sync_playwright() as playwright, httpx.Client(base_url=server.url, timeout=60) as http:
            browser = launch_browser(playwright)
            with guarded_page(browser, server.url) as page:
                job_id = busy_worker(http)  # the page's model load waits behind it
                page.goto(server.url)  # the page opens on the first checkpoint, FLUX.1-schnell
                page.wait_for_selector("#txt2img-generate", timeout=60_000)
                page.wait_for_function("document.body.dataset.modelDefaults === 'pending'", timeout=30_000)
                page.locator("#txt2img-steps input[type=number]").fill("9")  # typed, not yet entered
                assert page.evaluate(f"!({APPLIED})"), "the presets came before the user typed"
                typed_cfg = act_as_the_update_arrives(  # CFG moved with the keyboard the moment the presets arrive
                    page, lambda: http.delete(f"/api/v1/jobs/{job_id}"), APPLIED,
                    lambda: press_slider(page, "txt2img-cfg-scale"))
                wait_all_applied(page, APPLIED)
                schnell_values = {"txt2img-steps": "9", "txt2img-cfg-scale": typed_cfg, "txt2img-sampler": "Euler",
                                  "txt2img-scheduler": "Simple", "img2img-steps": "4", "img2img-cfg-scale": "1",
                                  "img2img-sampler": "Euler", "img2img-scheduler": "Simple"}
                assert shown(page) == schnell_values
                choose_checkpoint(page, "tiny-sd")  # SD: the untouched fields take the page's built values
                wait_value(page, "txt2img-scheduler", "Automatic")
                wait_all_applied(page, APPLIED)
                assert shown(page) == {**schnell_values, "txt2img-sampler": "DPM++ 2M", "txt2img-scheduler": "Automatic",
                                       "img2img-steps": str(built.steps), "img2img-cfg-scale": "7",
                                       "img2img-sampler": "DPM++ 2M", "img2img-scheduler": "Automatic"}
                choose_checkpoint(page, "tiny-schnell")  # and follow the family again; the user's values stay
                wait_value(page, "txt2img-scheduler", "Simple")
                wait_all_applied(page, APPLIED)
                assert shown(page) == schnell_values
            browser.close()
    finally:
        server.stop()
