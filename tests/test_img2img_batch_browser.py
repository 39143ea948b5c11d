"""Browser test of img2img's Batch mode (issue 20): a folder of images, one with a mask of the same name,
goes through the queue as one job per image; results land in the output folder under the input names."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests import test_webui_browser as base
from tests.test_webui_browser import set_number
from tests.ui_helpers import (
    external_request_guard,
    open_img2img_mode,
    require_browser,
    screenshot_dir,
    start_ui_server,
)

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    running = start_ui_server(tmp_path_factory.mktemp("batch-ui"), {"tiny": tiny_checkpoints["sd1"]})
    yield running
    running.stop()


def test_batch_from_folders_writes_one_result_per_image(browser, server, tmp_path):
    src, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    src.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat.png", "dog.jpg"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / name)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(masks / "dog.png")

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    outside: list[str] = []
    external_request_guard(page, outside, server.url)
    page.goto(server.url)
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)
    page.get_by_role("tab", name="img2img", exact=True).click()
    open_img2img_mode(page, "Batch")
    for elem, value in (("img2img-batch-input", src), ("img2img-batch-output", out), ("img2img-batch-mask", masks)):
        page.locator(f"#{elem} textarea, #{elem} input").first.fill(str(value))
    for elem, value in (("img2img-width", 64), ("img2img-height", 64), ("img2img-steps", 2)):
        set_number(page, elem, value)
    time.sleep(0.5)
    page.click("#img2img-batch-run")
    page.wait_for_function("document.querySelector('#img2img-batch-status')?.innerText.includes('Batch finished')",
                           timeout=180_000)
    status = page.locator("#img2img-batch-status").inner_text()
    assert "2 image(s) saved" in status and "❌" not in status, status
    page.screenshot(path=str(screenshot_dir() / "img2img-batch.png"))
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png"]
    dog_in, dog_out = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (src / "dog.jpg",
                                                                                           out / "dog.png"))
    assert np.abs(dog_out[:, :24] - dog_in[:, :24]).max() < np.abs(dog_out[:, 40:] - dog_in[:, 40:]).max()
    assert "Mask blur" in Image.open(out / "dog.png").info["parameters"]  # inpainted: the mask was used
    page.locator("#img2img-batch-input textarea, #img2img-batch-input input").first.fill(str(tmp_path / "nope"))
    page.click("#img2img-batch-run")
    page.wait_for_function("document.querySelector('#img2img-batch-status')?.innerText.includes('not a folder')",
                           timeout=30_000)
    context.close()
    assert not outside, f"requests left 127.0.0.1: {outside}"
