"""Browser tests of face restoration (real server, Debian chromium): txt2img's "Restore faces"
checkbox writes the infotext, Extras' GFPGAN / CodeFormer sliders restore, and a server without
weights shows the message naming the files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests import test_webui_browser as base
from tests.test_faces_api import write_face_models
from tests.test_webui_browser import fill_txt2img, set_number_settled, wait_result, wait_text
from tests.test_webui_browser_extras import open_extras
from tests.ui_helpers import require_browser, start_ui_server

pytestmark = pytest.mark.slow
browser, page = base.browser, base.page  # the same fixtures, bound to this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-faces")
    write_face_models(root / "models")
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"]})
    yield running
    running.stop()


def test_restore_faces_checkbox_writes_the_infotext(page):
    fill_txt2img(page, "a face", seed=5, steps=1)
    page.locator("#txt2img-restore-faces input").check()
    page.click("#txt2img-generate")
    info = wait_result(page)
    assert "Face restoration: CodeFormer" in info, info


def test_extras_face_sliders_restore(page, tmp_path):
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    open_extras(page)
    page.locator("#extras-image input[type=file]").set_input_files(str(tmp_path / "f.png"))
    page.get_by_text("Face restoration (needs GFPGAN").click()
    set_number_settled(page, "extras-gfpgan-visibility", 1)
    set_number_settled(page, "extras-codeformer-visibility", 0.5)
    page.click("#extras-generate")
    wait_text(page, "#extras-message", "Done: 1 image(s)", timeout=120)
    wait_text(page, "#extras-info", "GFPGAN visibility: 1")
    wait_text(page, "#extras-info", "CodeFormer visibility: 0.5")


def test_settings_have_the_face_restoration_options(page):
    page.get_by_role("tab", name="Settings", exact=True).click()
    section = page.locator("#settings-section-face-restoration")
    section.wait_for(state="visible")
    text = section.inner_text()
    for word in ("Face restoration model", "CodeFormer", "GFPGAN", "RestoreFormer", "CodeFormer weight"):
        assert word in text, text
