"""Browser test of img2img's "Interrogate CLIP" / "Interrogate DeepBooru" / "Interrogate WD14" buttons (real
server, Debian chromium, tiny random interrogation models): the prompt gets the engine's text; errors are
messages."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from modules.interrogate.options import InterrogateOptions
from modules.interrogate.service import InterrogateFolders, Interrogator
from tests import test_webui_browser as base
from tests.interrogate_helpers import install_models
from tests.test_webui_browser import message_of
from tests.ui_helpers import require_browser, start_ui_server

pytestmark = pytest.mark.slow
browser, page = base.browser, base.page  # the same fixtures, bound to this module's server
OPTIONS = {"interrogate_clip_min_length": 3, "interrogate_clip_max_length": 6,
           "interrogate_deepbooru_score_threshold": 0.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-interrogate")
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"]})
    install_models(running.context.app.settings.models_dir)
    if importlib.util.find_spec("onnxruntime"):  # the WD14 tagger runs on onnxruntime (the wd14 extra)
        from tests.test_interrogate_wd14 import write_tagger
        write_tagger(running.context.app.settings.models_dir / "interrogators" / "tiny-tagger")
    running.context.options.update(OPTIONS)
    yield running
    running.stop()


def _expected(server, image: Image.Image, model: str) -> str:
    folders = InterrogateFolders.under(server.context.app.settings.models_dir)
    return Interrogator(folders).interrogate(image.convert("RGB"), model, InterrogateOptions.from_options(OPTIONS))


def _prompt(page) -> str:
    return page.locator("#img2img-prompt textarea").input_value()


def _open_with_image(page, tmp_path) -> Image.Image:
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "source.png")
    page.get_by_role("tab", name="img2img", exact=True).first.click()
    page.locator("#img2img-image input[type=file]").set_input_files(str(tmp_path / "source.png"))
    page.locator("#img2img-image img").first.wait_for(state="visible", timeout=10_000)
    return image


@pytest.mark.parametrize("model", ["deepdanbooru", "clip", "wd14"])
def test_interrogate_buttons_fill_the_prompt(page, server, tmp_path, model):
    if model == "wd14":
        pytest.importorskip("onnxruntime")
    image = _open_with_image(page, tmp_path)
    page.fill("#img2img-prompt textarea", "old prompt")
    expected = _expected(server, image, model)
    assert expected
    page.click(f"#img2img-interrogate-{model}")
    page.wait_for_function("e => document.querySelector('#img2img-prompt textarea').value === e", arg=expected,
                           timeout=60_000)
    assert message_of(page, "img2img") == ""


def test_interrogate_without_image_or_model_is_a_message(page, server, tmp_path):
    page.get_by_role("tab", name="img2img", exact=True).first.click()
    page.fill("#img2img-prompt textarea", "kept")
    page.click("#img2img-interrogate-clip")
    page.wait_for_function("() => document.querySelector('#img2img-message')?.innerText.includes('Add an image')",
                           timeout=30_000)
    _open_with_image(page, tmp_path)
    blip = server.context.app.settings.models_dir / "BLIP"
    blip.rename(blip.with_name("BLIP-away"))
    try:
        page.click("#img2img-interrogate-clip")
        page.wait_for_function("() => document.querySelector('#img2img-message')?.innerText.includes('models/BLIP')",
                               timeout=30_000)
    finally:
        blip.with_name("BLIP-away").rename(blip)
    text = message_of(page, "img2img")
    assert "needs a BLIP captioning model" in text and "Traceback" not in text
    assert _prompt(page) == "kept"


def test_settings_interrogate_section_reaches_the_buttons(page, server, tmp_path):
    page.get_by_role("tab", name="Settings", exact=True).click()
    assert page.locator("#settings-section-interrogate").is_visible()
    threshold = page.locator("#setting-interrogate_deepbooru_score_threshold input[type=number]")
    threshold.fill("1")
    threshold.press("Enter")
    page.click("#settings-save")
    page.wait_for_function("document.querySelector('#settings-message')?.innerText.includes('Saved')")
    try:
        assert server.context.options.get("interrogate_deepbooru_score_threshold") == 1
        _open_with_image(page, tmp_path)
        page.fill("#img2img-prompt textarea", "old prompt")
        page.click("#img2img-interrogate-deepdanbooru")  # no tag scores 1: an empty prompt
        page.wait_for_function("() => document.querySelector('#img2img-prompt textarea').value === ''",
                               timeout=60_000)
    finally:
        server.context.options.update(OPTIONS)


def test_interrogate_wd14_without_a_tagger_is_a_message(page, server, tmp_path):
    """No tagger folder installed: the message names the folder and the files; the prompt stays."""
    _open_with_image(page, tmp_path)
    page.fill("#img2img-prompt textarea", "kept")
    taggers = server.context.app.settings.models_dir / "interrogators"
    taggers.rename(taggers.with_name("interrogators-away"))
    try:
        page.click("#img2img-interrogate-wd14")
        page.wait_for_function("() => document.querySelector('#img2img-message')?.innerText.includes('WD14')",
                               timeout=30_000)
    finally:
        taggers.with_name("interrogators-away").rename(taggers)
    text = message_of(page, "img2img")
    assert "WD14 tagging needs a tagger folder" in text and "model.onnx" in text and "selected_tags.csv" in text
    assert "Traceback" not in text
    assert _prompt(page) == "kept"
