"""Browser test: steps, CFG, sampler and schedule follow the checkpoint's family (FLUX.1-schnell: 4 steps, CFG 1,
Euler / Simple) until the user sets them, even when the user sets them while the model is still loading.
Debian chromium + playwright against the real server on 127.0.0.1."""
from __future__ import annotations

import time

import httpx
import pytest

from modules.pipeline.params import Txt2ImgParams
from tests.fixtures.make_tiny_mmdit import make_all_in_one
from tests.test_webui_browser_a1111 import choose_checkpoint
from tests.test_webui_browser_issue20 import busy_worker
from tests.ui_helpers import guarded_page, launch_browser, require_browser, start_ui_server

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


def slide_as_the_presets_arrive(page, http: httpx.Client, job_id: str) -> str:
    """Frees the worker, then moves CFG with the keyboard at the moment the presets arrive: the page's round
    trips to the server (if it makes any to apply them) are held until the user has moved it. Returns the
    value the user set."""
    held: list = []
    page.wait_for_timeout(500)  # the typing's own round trips (if the page makes any) are not the ones to hold
    page.route("**/run/**", lambda route: held.append(route))
    http.delete(f"/api/v1/jobs/{job_id}")
    deadline = time.monotonic() + 180
    while not held and not page.evaluate(APPLIED):
        assert time.monotonic() < deadline, "the presets never arrived"
        page.wait_for_timeout(50)
    before = value(page, "txt2img-cfg-scale")
    page.locator("#txt2img-cfg-scale input[type=range]").focus()
    page.keyboard.press("ArrowRight")  # one step up with the keyboard
    page.wait_for_function("v => document.querySelector('#txt2img-cfg-scale input').value !== v", arg=before)
    page.wait_for_timeout(500)  # the key's own events (key up, the slider's release) settle first
    for route in held:
        route.continue_()
    page.unroute("**/run/**")
    return value(page, "txt2img-cfg-scale")


def wait_all_applied(page) -> None:
    """The page load's update and the checkpoint change's have both run; nothing else comes."""
    page.wait_for_function(APPLIED, timeout=180_000)
    time.sleep(1.0)
    page.wait_for_function(APPLIED, timeout=180_000)


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
                typed_cfg = slide_as_the_presets_arrive(page, http, job_id)
                wait_all_applied(page)
                schnell_values = {"txt2img-steps": "9", "txt2img-cfg-scale": typed_cfg, "txt2img-sampler": "Euler",
                                  "txt2img-scheduler": "Simple", "img2img-steps": "4", "img2img-cfg-scale": "1",
                                  "img2img-sampler": "Euler", "img2img-scheduler": "Simple"}
                assert shown(page) == schnell_values
                choose_checkpoint(page, "tiny-sd")  # SD: the untouched fields take the page's built values
                wait_value(page, "txt2img-scheduler", "Automatic")
                wait_all_applied(page)
                assert shown(page) == {**schnell_values, "txt2img-sampler": "DPM++ 2M", "txt2img-scheduler": "Automatic",
                                       "img2img-steps": str(built.steps), "img2img-cfg-scale": "7",
                                       "img2img-sampler": "DPM++ 2M", "img2img-scheduler": "Automatic"}
                choose_checkpoint(page, "tiny-schnell")  # and follow the family again; the user's values stay
                wait_value(page, "txt2img-scheduler", "Simple")
                wait_all_applied(page)
                assert shown(page) == schnell_values
            browser.close()
    finally:
        server.stop()
