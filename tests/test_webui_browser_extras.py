"""Browser tests of the Extras tab (real server, Debian chromium): a model upscaler on one image at an
exact size, a folder batch, the face-restoration message, and "Send to extras" from txt2img's gallery,
PNG Info and History."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import test_webui_browser as base
from tests.fixtures import make_tiny_upscalers as tiny
from tests.test_webui_browser import (
    fill_txt2img,
    gallery_image,
    set_number,
    set_number_settled,
    wait_result,
    wait_text,
)
from tests.ui_helpers import require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
browser, page = base.browser, base.page  # the same fixtures, bound to this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-extras")
    tiny.write(tiny.esrgan_old(2), root / "models" / "ESRGAN" / "4x-Tiny.pth")
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"]})
    running.root = root
    yield running
    running.stop()


def _random(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def open_extras(page) -> None:
    page.get_by_role("tab", name="Extras", exact=True).first.click()
    page.wait_for_selector("#extras-generate", state="visible")


def choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value === {value!r}")


def saved(server) -> list[Path]:
    return sorted((server.root / "outputs" / "extras-images").rglob("*.png"))


def test_single_image_model_upscale_is_exact(page, server, tmp_path):
    _random(24, 20).save(tmp_path / "small.png")
    open_extras(page)
    page.locator("#extras-image input[type=file]").set_input_files(str(tmp_path / "small.png"))
    choose(page, "extras-upscaler-1", "4x-Tiny")
    set_number(page, "extras-upscaling-resize", 2)
    before = len(saved(server))
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 1 image(s)", timeout=120)
    wait_text(page, "#extras-info", "Postprocess upscaler: 4x-Tiny")
    assert gallery_image(page, server, "extras").size == (48, 40)
    files = saved(server)
    assert len(files) == before + 1 and Image.open(files[-1]).size == (48, 40)
    page.screenshot(path=str(screenshot_dir() / "extras.png"), full_page=True)


def test_face_restoration_gives_a_message_not_a_traceback(page, tmp_path):
    _random(16, 16).save(tmp_path / "face.png")
    open_extras(page)
    page.locator("#extras-image input[type=file]").set_input_files(str(tmp_path / "face.png"))
    page.get_by_text("Face restoration (needs GFPGAN").click()
    set_number_settled(page, "extras-gfpgan-visibility", 0.5)
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "models/GFPGAN")
    assert "Traceback" not in page.locator("#extras-message").inner_text()


def test_restore_faces_without_weights_names_the_files(page):
    fill_txt2img(page, "a face", seed=5, steps=1)
    page.locator("#txt2img-restore-faces input").check()
    page.click("#txt2img-generate")
    message = wait_result(page)
    assert "codeformer-v0.1.0.pth" in message and "models/Codeformer" in message, message
    assert "detection_Resnet50_Final.pth" in message and "Traceback" not in message


def test_batch_from_directory_scale_to(page, server):
    folder = server.root / "outputs" / "batch-in"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _random(20, 10, seed=i).save(folder / f"in{i}.png")
    (folder / "notes.txt").write_text("not an image")
    open_extras(page)
    page.get_by_label("Batch from Directory").check()
    page.fill("#extras-input-dir textarea, #extras-input-dir input", str(folder))
    page.fill("#extras-output-dir textarea, #extras-output-dir input", str(server.root / "outputs" / "batch-out"))
    page.get_by_label("Scale to").check()
    set_number(page, "extras-resize-w", 30)
    set_number(page, "extras-resize-h", 30)
    choose(page, "extras-upscaler-1", "Lanczos")
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 2 image(s)", timeout=60)
    out = sorted((server.root / "outputs" / "batch-out").rglob("*.png"))
    assert [Image.open(p).size for p in out] == [(30, 30), (30, 30)]


def test_send_to_extras_from_the_txt2img_gallery(page, server):
    fill_txt2img(page, "a lighthouse", seed=7, steps=2)
    page.click("#txt2img-generate")
    assert "Seed: 7" in wait_result(page)
    source = gallery_image(page, server, "txt2img").size  # (the model's native size may have replaced 64)
    page.click("#txt2img-send-to-extras")
    page.wait_for_selector("#extras-image img", state="visible", timeout=30_000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not page.locator("#extras-generate").is_visible():
        time.sleep(0.1)
    assert page.locator("#extras-generate").is_visible(), "send-to did not switch to Extras"
    choose(page, "extras-upscaler-1", "4x-Tiny")
    set_number(page, "extras-upscaling-resize", 2)
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 1 image(s)", timeout=120)
    assert gallery_image(page, server, "extras").size == (2 * source[0], 2 * source[1])


def _switched_to_extras(page) -> None:
    page.wait_for_selector("#extras-image img", state="visible", timeout=30_000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not page.locator("#extras-generate").is_visible():
        time.sleep(0.1)
    assert page.locator("#extras-generate").is_visible(), "send-to did not switch to Extras"


def test_send_to_extras_from_png_info(page, server, tmp_path):
    path = tmp_path / "pnginfo-source.png"
    _random(20, 12, seed=3).save(path)
    page.get_by_role("tab", name="PNG Info", exact=True).first.click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#pnginfo-image img", state="visible", timeout=30_000)
    page.click("#pnginfo-send-to-extras")
    _switched_to_extras(page)
    choose(page, "extras-upscaler-1", "Nearest")
    set_number(page, "extras-upscaling-resize", 2)
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 1 image(s)", timeout=120)
    out = Image.open(saved(server)[-1])
    assert out.size == (40, 24)
    # pixel-exact: the sent image is not recompressed on the way (Gradio's lossy webp default)
    expected = _random(20, 12, seed=3).resize((40, 24), Image.NEAREST)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))


def test_send_to_extras_from_history(page, server):
    fill_txt2img(page, "a harbour", seed=11, steps=2)
    page.click("#txt2img-generate")
    assert "Seed: 11" in wait_result(page)
    page.get_by_role("tab", name="History", exact=True).first.click()
    page.locator("#history-table [role=gridcell]:visible", has_text="a harbour").first.click()
    wait_text(page, "#history-infotext", "Seed: 11")
    page.click("#history-send-to-extras")
    _switched_to_extras(page)
    choose(page, "extras-upscaler-1", "Nearest")
    set_number(page, "extras-upscaling-resize", 2)
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 1 image(s)", timeout=120)
    source = sorted((server.root / "outputs" / "txt2img-images").rglob("*.png"))[-1]
    with Image.open(source) as image:
        expected = image.convert("RGB").resize((2 * image.width, 2 * image.height), Image.NEAREST)
    assert np.array_equal(np.asarray(Image.open(saved(server)[-1]).convert("RGB")), np.asarray(expected))
