"""Browser test of the top bar's VAE / Text Encoder picker and SD VAE (issues 15 and 20): a tiny FLUX.1
transformer-only file with split CLIP-L / T5 / VAE files, picked in Chromium, generates; the infotext has
Forge's Module lines; pasting it (and PNG Info -> txt2img) restores the picker; the SD VAE swaps the SD image."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from tests import test_webui_browser as base
from tests.test_component_picker import PICK, write_components, write_sd_vae
from tests.test_webui_browser import fill_txt2img, gallery_image, infotext_of, wait_result, wait_text
from tests.ui_helpers import guarded_page, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server
MODULES = "Module 1: ae, Module 2: clip_l, Module 3: t5xxl_b_fp16"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    from tests.fixtures.make_tiny_mmdit import make_split_files

    require_browser()
    root = tmp_path_factory.mktemp("picker-ui")
    models = root / "models"
    write_components(models, root / "parts")
    write_sd_vae(models, tiny_checkpoints["sd2"])
    (root / "data").mkdir()
    (root / "data" / "config.json").write_text(json.dumps({"sd_model_checkpoint": "tiny"}))
    flux = make_split_files("flux-schnell", root / "flux")["transformer"]
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"], "flux": flux})
    yield running
    running.stop()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url) as page:
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)
        yield page


def choose(page, selector: str, name: str) -> None:
    """Type into a dropdown to filter its list, then take the first match with Enter (as a user may)."""
    box = page.locator(f"{selector} input").first
    box.click()
    box.fill("")
    page.keyboard.type(name)
    page.get_by_role("option", name=re.compile(f"^{re.escape(name)}")).first.wait_for(timeout=10_000)
    page.keyboard.press("Enter")


def wait_option(server, key: str, value, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while server.context.options.get(key) != value:
        assert time.monotonic() < deadline, f"{key} is {server.context.options.get(key)!r}, not {value!r}"
        time.sleep(0.2)


def picker_values(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('#quicksettings-forge_additional_modules .token')]
        .map(t => t.innerText.trim())""")


def generate(page, server, prompt: str = "a fox") -> tuple[str, np.ndarray]:
    fill_txt2img(page, prompt, seed=5, steps=2)
    before = infotext_of(page)
    page.click("#txt2img-generate")
    page.wait_for_function("old => { const t = (document.querySelector('#txt2img-infotext pre')?.innerText || '')"
                           ".trim(); return t && t !== old; }", arg=before, timeout=180_000)  # not the last job's
    info = wait_result(page, timeout=180)
    return info, np.asarray(gallery_image(page, server, "txt2img"), dtype=np.int16)


def test_pick_modules_generate_flux_and_paste_restores(page, server, tmp_path):
    for key in ("sd_vae", "forge_additional_modules", "CLIP_stop_at_last_layers"):
        assert page.locator(f"#quicksettings-{key}").is_visible(), key
    choose(page, "#checkpoint", "flux")  # transformer only; by name two T5 files are found: ambiguous
    wait_text(page, "#checkpoint-status", "2 t5xxl text encoders found", timeout=120)
    for i, name in enumerate(PICK):  # one file at a time, each saved (and tried) before the next
        choose(page, "#quicksettings-forge_additional_modules", name)
        page.keyboard.press("Escape")
        wait_option(server, "forge_additional_modules", PICK[: i + 1])
    wait_text(page, "#checkpoint-status", "Loaded flux", timeout=120)
    wait_option(server, "sd_model_checkpoint", server.context.title(server.context.find_checkpoint("flux")))
    info, image = generate(page, server)
    assert MODULES in info, info
    assert image.shape[:2] == (64, 64)
    page.screenshot(path=str(screenshot_dir() / "picker-flux.png"))

    server.context.options.update({"forge_additional_modules": []})  # cleared elsewhere; the page is reloaded
    page.reload()
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    assert picker_values(page) == []
    page.fill("#txt2img-prompt textarea", info)
    page.click("#txt2img-read-params")
    wait_option(server, "forge_additional_modules", PICK)
    assert picker_values(page) == PICK

    from PIL import Image

    from modules import images

    server.context.options.update({"forge_additional_modules": []})
    page.reload()
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    path = images.save_image(Image.new("RGB", (32, 32), "gray"), tmp_path, 5, info)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(path))
    wait_text(page, "#pnginfo-table", "t5xxl_b_fp16")
    page.click("#pnginfo-send-to-txt2img")
    wait_option(server, "forge_additional_modules", PICK)
    assert picker_values(page) == PICK


def test_sd_vae_swaps_the_image_and_automatic_restores_it(page, server):
    choose(page, "#checkpoint", "tiny")
    wait_option(server, "sd_model_checkpoint", server.context.title(server.context.find_checkpoint("tiny")))
    own_info, own = generate(page, server, "a cat")
    assert "VAE:" not in own_info
    choose(page, "#quicksettings-sd_vae", "sd_other.safetensors")
    wait_option(server, "sd_vae", "sd_other.safetensors")
    info, swapped = generate(page, server, "a cat")
    assert "VAE: sd_other.safetensors" in info and np.abs(swapped - own).max() > 0
    choose(page, "#quicksettings-sd_vae", "Automatic")
    wait_option(server, "sd_vae", "Automatic")
    info, back = generate(page, server, "a cat")
    assert "VAE:" not in info and np.array_equal(back, own)
