"""Browser test of the ControlNet accordion (real chromium): upload a control image, pick a model,
preview the preprocessor, generate, and the result differs from the same job without ControlNet."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from PIL import Image

from tests import test_webui_browser as base
from tests.fixtures.make_tiny_controlnet import make_tiny_controlnet
from tests.test_webui_browser import fill_txt2img, gallery_image, wait_result
from tests.ui_helpers import REPO, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
browser, page = base.browser, base.page
UNIT = "#txt2img-controlnet-0"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-cn")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    shutil.copy(make_tiny_controlnet("sd1", root / "src" / "cn-sd1.safetensors", seed=2), folder / "tiny-sd15-canny.safetensors")
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"]}, settings_overrides={
        "extensions_dirs": (REPO / "extensions",), "extensions_allow": ("controlnet",)})
    yield running
    running.stop()


def control_image(path) -> None:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (10, 10, 54, 30))
    image.save(path)


def test_upload_a_control_image_and_generate(page, server, tmp_path):
    fill_txt2img(page, "a lighthouse", seed=11, steps=3)
    page.click("#txt2img-generate")
    assert "ControlNet" not in wait_result(page)
    plain = np.asarray(gallery_image(page, server, "txt2img"), dtype=float)

    page.click("#txt2img-ext-controlnet")  # open the accordion
    control_image(tmp_path / "hint.png")
    upload = page.locator(f"{UNIT}-image input[type=file]")
    upload.wait_for(state="attached")
    upload.set_input_files(str(tmp_path / "hint.png"))
    page.wait_for_function(f"document.querySelector('{UNIT}-enabled input').checked", timeout=30_000)
    page.locator(f"{UNIT}-type").get_by_text("Canny", exact=True).click()
    page.wait_for_function(f"document.querySelector('{UNIT}-module input').value === 'canny'", timeout=30_000)
    page.wait_for_function(f"document.querySelector('{UNIT}-model input').value.startsWith('tiny-sd15-canny [')",
                           timeout=30_000)  # the Control Type picked the matching model
    page.click(f"{UNIT}-run-preview")
    page.locator(f"{UNIT}-preview img").first.wait_for(state="visible", timeout=30_000)
    time.sleep(0.5)
    page.screenshot(path=str(screenshot_dir() / "controlnet-unit.png"), full_page=True)
    page.click("#txt2img-generate")
    info = wait_result(page)
    assert 'ControlNet 0: "Module: canny, Model: tiny-sd15-canny [' in info, info
    controlled = np.asarray(gallery_image(page, server, "txt2img"), dtype=float)
    assert np.abs(controlled - plain).mean() > 1.0


def test_send_dimensions_puts_the_control_image_size_in_width_and_height(page, server, tmp_path):
    fill_txt2img(page, "a tower", seed=3, steps=2)
    page.click("#txt2img-ext-controlnet")
    Image.new("RGB", (96, 130), (200, 30, 30)).save(tmp_path / "tall.png")
    upload = page.locator(f"{UNIT}-image input[type=file]")
    upload.wait_for(state="attached")
    upload.set_input_files(str(tmp_path / "tall.png"))
    page.locator(f"{UNIT}-image img").first.wait_for(state="visible", timeout=30_000)
    page.click(f"{UNIT}-send-size")
    page.wait_for_function("document.querySelector('#txt2img-width input').value === '96' && "
                           "document.querySelector('#txt2img-height input').value === '128'", timeout=30_000)
    page.locator(f"{UNIT}-enabled input").uncheck()  # no model picked: generate without the unit
    page.click("#txt2img-generate")
    assert "Size: 96x128" in wait_result(page)  # the job got the sent size, not only the boxes


def test_pnginfo_send_to_txt2img_restores_the_units(page, server, tmp_path):
    from modules import images
    from tests.test_webui_browser import wait_text

    page.click("#txt2img-ext-controlnet")
    page.get_by_role("tab", name="ControlNet Unit 1").click()
    page.locator("#txt2img-controlnet-1-enabled input").check()  # a unit the infotext does not name: turned off
    unit = ("Module: canny, Model: tiny-sd15-canny, Weight: 0.6, Resize Mode: Just Resize, Processor Res: 256, "
            "Threshold A: 90.0, Threshold B: 180.0, Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: True, "
            "Control Mode: ControlNet is more important")
    text = f'a lighthouse\nSteps: 3, Sampler: Euler, Seed: 5, Size: 64x64, ControlNet 0: "{unit}"'
    path = images.save_image(Image.new("RGB", (32, 32), "gray"), tmp_path, 5, text)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(path))
    wait_text(page, "#pnginfo-table", "ControlNet 0")
    page.click("#pnginfo-send-to-txt2img")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'a lighthouse'",
                           timeout=30_000)
    page.wait_for_function("!document.querySelector('#txt2img-controlnet-1-enabled input').checked", timeout=30_000)
    page.get_by_role("tab", name="ControlNet Unit 0").click()
    page.wait_for_function(f"document.querySelector('{UNIT}-enabled input')?.checked", timeout=30_000)
    assert page.locator(f"{UNIT}-module input").input_value() == "canny"
    assert page.locator(f"{UNIT}-model input").input_value().startswith("tiny-sd15-canny [")  # the installed title
    for name, value in (("weight", "0.6"), ("start", "0.1"), ("end", "0.8"), ("res", "256"), ("a", "90"),
                        ("b", "180")):
        assert float(page.locator(f"{UNIT}-{name} input[type=number]").input_value()) == float(value), name
    assert page.locator(f"{UNIT}-pixel-perfect input").is_checked()
    assert page.locator(f"{UNIT}-control-mode input:checked").input_value() == "ControlNet is more important"
    assert page.locator(f"{UNIT}-resize-mode input:checked").input_value() == "Just Resize"
    page.screenshot(path=str(screenshot_dir() / "controlnet-pasted.png"), full_page=True)


def slider_state(page, name: str) -> dict:
    """A unit slider's visibility, label, range and value as the page shows them."""
    return page.evaluate("""(id) => {
      const box = document.querySelector(id);
      const range = box?.querySelector('input[type=range]');
      const shown = !!box && box.offsetParent !== null;
      return {shown, label: shown ? box.innerText.split('\\n')[0].trim() : '',
              max: range ? Number(range.max) : null, value: range ? Number(range.value) : null};
    }""", f"{UNIT}-{name}")


def test_sliders_follow_the_preprocessor(page):
    """As sd-webui-controlnet: each preprocessor shows its own sliders, named and ranged, with its defaults."""
    page.click("#txt2img-ext-controlnet")
    assert not slider_state(page, "a")["shown"] and not slider_state(page, "res")["shown"]  # "none" has none
    page.locator(f"{UNIT}-type").get_by_text("Canny", exact=True).click()
    page.wait_for_function(f"document.querySelector('{UNIT}-a')?.innerText.includes('Canny Low Threshold')",
                           timeout=30_000)
    low, high = slider_state(page, "a"), slider_state(page, "b")
    assert (low["max"], low["value"], high["value"]) == (255, 100, 200), (low, high)
    assert high["label"].startswith("Canny High Threshold") and slider_state(page, "res")["shown"]
    page.locator(f"{UNIT}-type").get_by_text("Reference", exact=True).click()
    page.wait_for_function(f"document.querySelector('{UNIT}-a')?.innerText.includes('Style Fidelity')",
                           timeout=30_000)
    fidelity = slider_state(page, "a")
    assert (fidelity["max"], fidelity["value"]) == (1, 0.5), fidelity  # 100 does not fit 0-1: the default
    assert not slider_state(page, "b")["shown"] and not slider_state(page, "res")["shown"]
