"""Browser tests of the web UI as an A1111 user meets it (issue 20): layout at 1280x720, icons and
tooltips, native sizes, gallery and lightbox, live preview, keyboard habits, send to PNG info, outpainting.

One server (the bundled demo model and a tiny SD1 checkpoint) and one browser for the module.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from modules.demo import DEMO_CHECKPOINT
from tests import test_webui_browser as base
from tests.test_webui_browser import gallery_image, message_of, set_number, wait_result, wait_running
from tests.ui_helpers import (
    guarded_page,
    open_img2img_mode,
    require_browser,
    screenshot_dir,
    start_ui_server,
)

pytestmark = pytest.mark.slow
browser = base.browser  # the same fixture, bound to this module's server
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\u2b00-\u2bff\ufe0f]")
TABS = ("txt2img", "img2img", "PNG Info", "History", "Settings", "Extensions")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    if not DEMO_CHECKPOINT.exists():
        pytest.skip("the bundled demo checkpoint is missing")
    root = tmp_path_factory.mktemp("webui-a1111")
    (root / "data").mkdir()  # quicksettings_list extended by one entry, as a user would in Settings
    (root / "data" / "config.json").write_text(json.dumps({"quicksettings_list": [
        "sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "randn_source"]}))
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"], "demo": DEMO_CHECKPOINT})
    yield running
    running.stop()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url, 1280, 720) as page:
        page.goto(server.url)
        page.wait_for_selector("#txt2img-generate", timeout=60_000)
        page.wait_for_function("document.querySelector('#checkpoint input')?.value", timeout=30_000)
        # the model's native size is applied once it has loaded; typing before then could be overwritten
        page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)
        yield page


def number(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def wait_number(page, elem_id: str, value: int, timeout: float = 60) -> None:
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input[type=number]`)?.value === v",
                           arg=[elem_id, str(value)], timeout=timeout * 1000)


def choose_checkpoint(page, name: str) -> None:
    page.locator("#checkpoint input").click()
    page.get_by_role("option", name=re.compile(f"^{name}")).click()


def box(page, selector: str) -> dict:
    found = page.locator(selector).first.bounding_box()
    assert found is not None, f"{selector} is not rendered"
    return found


def test_layout_icons_tooltips_tabs_and_native_size(page):
    """At 1280x720: each tab once, the result column beside the controls and above the fold, icon buttons
    drawn as SVG with aria-label and tooltip (no emoji), A1111's tooltips; sizes follow the model."""
    for name in TABS:
        tabs = page.get_by_role("tab", name=name, exact=True)
        assert tabs.count() == 1 and tabs.first.is_visible(), f"tab {name!r} appears {tabs.count()} times"
    visible_tab_texts = page.evaluate("""() => [...document.querySelectorAll('#tabs button')]
        .filter(b => b.offsetParent !== null && !b.closest('[aria-hidden=true], .visually-hidden, .hide'))
        .map(b => b.innerText.trim()).filter(t => t)""")
    for name in TABS:
        assert visible_tab_texts.count(name) == 1, visible_tab_texts

    prompt, results = box(page, "#txt2img-prompt"), box(page, "#txt2img-results")
    assert results["x"] >= prompt["x"] + prompt["width"] - 1, "the result column is not beside the controls"
    for selector in ("#txt2img-generate", "#txt2img-progress", "#txt2img-gallery", "#txt2img-send-to-pnginfo",
                     "#txt2img-infotext"):
        assert box(page, selector)["y"] < 720, f"{selector} is below the fold"
    assert box(page, "#txt2img-send-to-pnginfo")["y"] + box(page, "#txt2img-send-to-pnginfo")["height"] <= 720
    page.screenshot(path=str(screenshot_dir() / "a1111-layout-1280x720.png"))

    page.wait_for_selector("#txt2img-random-seed svg")
    for suffix in ("random-seed", "reuse-seed", "swap-size", "read-params", "apply-styles"):
        button = page.locator(f"#txt2img-{suffix}")
        assert button.get_attribute("aria-label") and button.get_attribute("title"), suffix
        assert button.locator("svg").count() == 1, suffix
    assert "new random number" in page.locator("#txt2img-random-seed").get_attribute("aria-label")
    assert page.locator("#checkpoint-refresh").get_attribute("aria-label") == "Refresh the checkpoint list"
    texts = page.evaluate("() => [...document.querySelectorAll('button')].map(b => b.innerText)")
    assert not [t for t in texts if EMOJI.search(t)], [t for t in texts if EMOJI.search(t)]
    assert page.locator("#txt2img-steps").get_attribute("title").startswith("How many times to improve")
    assert "Classifier Free Guidance" in page.locator("#txt2img-cfg-scale").get_attribute("title")
    assert page.locator("#txt2img-seed").get_attribute("title").startswith("A value that determines the output")

    assert page.locator("#checkpoint input").input_value().startswith("demo")  # the default here
    wait_number(page, "txt2img-width", 128)  # the demo model declares 128x128
    wait_number(page, "txt2img-height", 128)
    choose_checkpoint(page, "tiny")  # a plain SD1 checkpoint: SD1's 512
    wait_number(page, "txt2img-width", 512)
    wait_number(page, "txt2img-height", 512)
    set_number(page, "txt2img-width", 192)  # the user's own size stays through a switch
    choose_checkpoint(page, "demo")
    page.get_by_role("tab", name="img2img", exact=True).click()
    wait_number(page, "img2img-width", 128)
    assert number(page, "txt2img-width") == "192" and number(page, "txt2img-height") == "512"
    assert page.locator("#img2img-denoising").get_attribute("title").startswith("Determines how little respect")


def test_gallery_lightbox_preview_keyboard_and_send_to_pnginfo(page, server):
    area = page.locator("#txt2img-prompt textarea")
    area.fill("a red fox")
    area.evaluate("a => a.setSelectionRange(7, 7)")  # the caret in "fox"
    area.press("Control+ArrowUp")
    assert area.input_value() == "a red (fox:1.1)"
    area.press("Control+ArrowUp")
    assert area.input_value() == "a red (fox:1.2)"
    area.press("Control+ArrowDown")
    area.press("Control+ArrowDown")
    assert area.input_value() == "a red fox"
    for elem, value in (("txt2img-width", 64), ("txt2img-height", 64), ("txt2img-steps", 40),
                        ("txt2img-batch-size", 4)):
        set_number(page, elem, value)
    page.locator("#txt2img-tiling input").check()  # seamless tiling reaches the job
    area.press("Control+Enter")
    preview_sizes = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not base.infotext_of(page):
        found = page.evaluate("""() => { const img = document.querySelector('#txt2img-preview img');
            const frame = document.querySelector('#txt2img-preview');
            return img && img.complete && img.naturalWidth ? [img.naturalWidth,
                img.getBoundingClientRect().height / frame.getBoundingClientRect().height] : null; }""")
        if found:
            preview_sizes.add((found[0], round(found[1], 1)))
        time.sleep(0.05)
    info = wait_result(page)
    assert "Seed:" in info and "Size: 64x64" in info and "Tiling: True" in info, info
    assert preview_sizes, "no live preview appeared"
    assert all(width == 64 and ratio >= 0.6 for width, ratio in preview_sizes), preview_sizes

    gallery = box(page, "#txt2img-gallery")
    thumbs = page.locator("#txt2img-gallery .thumbnail-item img")
    assert thumbs.count() == 4
    for i in range(4):
        thumb = thumbs.nth(i)
        assert thumb.evaluate("img => getComputedStyle(img).objectFit") == "contain"
        b = thumb.bounding_box()
        assert b["x"] >= gallery["x"] and b["x"] + b["width"] <= gallery["x"] + gallery["width"] + 0.5, (i, b)
    page.screenshot(path=str(screenshot_dir() / "a1111-gallery.png"))
    thumbs.nth(1).click()  # Gradio's preview of the second image; a click on it opens the lightbox
    time.sleep(0.5)
    page.evaluate("""() => { const imgs = [...document.querySelectorAll('#txt2img-gallery img')]
        .filter(i => !i.closest('.thumbnail-item')); imgs[0].click(); }""")
    page.locator("#atelier-lightbox img").wait_for(timeout=5_000)
    src = page.locator("#atelier-lightbox img").get_attribute("src")
    assert src.endswith(".png") and "00001-" in src, src
    shown = page.locator("#atelier-lightbox img").bounding_box()
    assert shown["height"] > 500, shown  # full screen, not a thumbnail
    page.screenshot(path=str(screenshot_dir() / "a1111-lightbox.png"))
    page.keyboard.press("ArrowRight")
    assert "00002-" in page.locator("#atelier-lightbox img").get_attribute("src")
    page.keyboard.press("Escape")
    assert page.locator("#atelier-lightbox").count() == 0

    first_seed = int(re.search(r"Seed: (\d+)", info).group(1))
    page.click("#txt2img-reuse-seed")  # the selected (second) image's seed
    page.wait_for_function("s => document.querySelector('#txt2img-seed input').value === s",
                           arg=str(first_seed + 1), timeout=10_000)
    page.click("#txt2img-random-seed")
    page.wait_for_function("document.querySelector('#txt2img-seed input').value === '-1'", timeout=10_000)

    page.click("#txt2img-send-to-pnginfo")
    page.wait_for_function("document.querySelector('#pnginfo-text textarea')?.value.includes('Seed:')",
                           timeout=15_000)
    text = page.locator("#pnginfo-text textarea").input_value()
    assert "a red fox" in text and "Steps: 40" in text, text
    assert "Sampler" in page.locator("#pnginfo-table").inner_text()


def test_keyboard_skip_and_interrupt(page):
    page.fill("#txt2img-prompt textarea", "a long job")
    for elem, value in (("txt2img-width", 64), ("txt2img-height", 64), ("txt2img-steps", 150),
                        ("txt2img-n-iter", 2)):
        set_number(page, elem, value)
    page.locator("#txt2img-prompt textarea").press("Control+Enter")
    wait_running(page)
    page.keyboard.press("Alt+Enter")  # skips the first batch
    deadline = time.monotonic() + 60
    while "batch 2/2" not in base.progress_text(page):
        assert time.monotonic() < deadline, base.progress_text(page)
        time.sleep(0.1)
    page.locator("body").press("Escape")
    base.wait_text(page, "#txt2img-message", "Interrupted: kept", timeout=90)  # the job ended interrupted
    assert "Seed:" in base.infotext_of(page)


def test_outpaint_keeps_the_original_pixels(page, server, tmp_path):
    original = base.stripes(tmp_path / "stripes.png")
    page.get_by_role("tab", name="img2img", exact=True).click()
    open_img2img_mode(page, "Outpaint")
    page.locator("#outpaint-image input[type=file]").set_input_files(str(tmp_path / "stripes.png"))
    page.locator("#outpaint-image img").first.wait_for()
    for elem, value in (("outpaint-left", 16), ("outpaint-right", 0), ("img2img-width", 64),
                        ("img2img-height", 64), ("img2img-steps", 3)):
        set_number(page, elem, value)
    page.fill("#img2img-prompt textarea", "stripes")
    page.click("#img2img-generate")
    info = wait_result(page, "img2img")
    assert 'Outpaint: "16,0,0,0"' in info, info
    result = gallery_image(page, server, "img2img")
    assert result.size == (80, 64)
    assert np.array_equal(np.asarray(result)[:, 16:], np.asarray(original.convert("RGB")))
    message = message_of(page, "img2img")
    assert "the 80x64 canvas" in message and "set width and height to 80x64" in message, message
    page.screenshot(path=str(screenshot_dir() / "a1111-outpaint.png"), full_page=True)


def toast_with(page, text: str, timeout: float = 15) -> str:
    """The text of the toast that shows `text` (Gradio's toasts)."""
    toast = page.locator("[data-testid=toast-body]", has_text=text).first
    toast.wait_for(timeout=timeout * 1000)
    return toast.inner_text()


def test_user_errors_reach_the_user(page, tmp_path):
    """An empty style name, a non-image named .png, out-of-range numbers and an empty history all say why."""
    page.click("#txt2img-save-style-box")
    page.locator("#txt2img-save-style").click()
    assert "Give the new style a name first" in toast_with(page, "Give the new style a name")

    steps = page.locator("#txt2img-steps input[type=number]")
    steps.fill("999")
    steps.press("Enter")
    note = page.locator(".atelier-clamp-note", has_text="999")
    note.wait_for(timeout=5_000)
    assert note.inner_text() == "Sampling steps: 999 is above the maximum of 150; 150 was applied."
    assert page.locator("#txt2img-steps input[type=range]").input_value() == "150"
    steps.press("Tab")
    page.wait_for_function("document.querySelector('#txt2img-steps input[type=number]').value === '150'")
    width = page.locator("#txt2img-width input[type=number]")
    width.fill("5000")
    width.press("Enter")
    assert "Width: 5000 is above the maximum of 1024; 1024 was applied." in \
        page.locator(".atelier-clamp-note", has_text="5000").inner_text()
    steps.fill("0")
    steps.press("Enter")
    assert "Sampling steps: 0 is below the minimum of 1; 1 was applied." in \
        page.locator(".atelier-clamp-note", has_text="below").inner_text()

    fake = tmp_path / "holiday.png"
    fake.write_text("these are not the pixels you are looking for")
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(fake))
    text = toast_with(page, "this file is not an image")
    assert "holiday.png" in text and "Traceback" not in text and "gradio" not in text.lower(), text

    page.get_by_role("tab", name="History", exact=True).click()
    page.wait_for_function("document.querySelector('#history-why')?.innerText.includes('signed-in user')")
    why = page.locator("#history-why").inner_text()
    assert "No jobs yet in this browser" in why and "--gradio-auth" in why, why
    page.screenshot(path=str(screenshot_dir() / "a1111-history-empty.png"))


def test_quicksettings_and_settings_search_apply_reload(page, server):
    """Checkpoint, VAE, clip skip and the configured extra (RNG source) in the top bar; Settings lists every
    option the server holds, by section, with a search box; Apply settings saves, Reload UI reloads."""
    options = server.context.options
    for key in ("sd_vae", "CLIP_stop_at_last_layers", "randn_source"):
        assert box(page, f"#quicksettings-{key}")["y"] < 130, f"{key} is not in the top bar"
    assert page.locator("#quicksettings-sd_vae input").is_enabled()  # changeable at run time, as in A1111
    clip = page.locator("#quicksettings-CLIP_stop_at_last_layers input[type=number]")
    clip.fill("2")
    clip.press("Enter")
    assert "Clip skip: 2" in toast_with(page, "Clip skip")
    assert options.get("CLIP_stop_at_last_layers") == 2

    page.get_by_role("tab", name="Settings", exact=True).click()
    keys = [k for k in options.all() if k != "sd_model_checkpoint"]
    for key in keys:
        widget = page.locator(f"#setting-{key}")
        assert widget.count() == 1, f"option {key} has no widget"
        editable = widget.locator("input:not([disabled]), textarea:not([disabled])").count() > 0
        assert editable == (key not in ("outdir_txt2img_samples", "outdir_img2img_samples",
                                        "samples_format")), key
    for section in ("stable-diffusion", "live-previews", "user-interface", "saving-images"):
        assert page.locator(f"#settings-section-{section}").is_visible()
    search = page.locator("#settings-search textarea, #settings-search input").first
    search.fill("preview")
    page.locator("#setting-CLIP_stop_at_last_layers").wait_for(state="hidden")
    assert page.locator("#setting-show_progress_every_n_steps").is_visible()
    assert not page.locator("#settings-section-saving-images").is_visible()
    page.screenshot(path=str(screenshot_dir() / "a1111-settings-search.png"))
    search.fill("")
    page.locator("#setting-CLIP_stop_at_last_layers").wait_for(state="visible")

    precision = page.locator("#setting-keyedit_precision_attention input[type=number]")
    precision.fill("0.05")
    precision.press("Enter")
    page.click("#settings-save")
    page.wait_for_function("document.querySelector('#settings-message')?.innerText.includes('Saved')")
    assert options.get("keyedit_precision_attention") == 0.05
    page.click("#settings-reload")
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    page.wait_for_function("document.querySelector('#atelier-ui-config [data-keyedit-step]')"
                           "?.dataset.keyeditStep === '0.05'")
    area = page.locator("#txt2img-prompt textarea")
    area.fill("owl")
    area.press("Control+ArrowUp")
    assert area.input_value() == "(owl:1.05)"
    options.update({"CLIP_stop_at_last_layers": 1, "keyedit_precision_attention": 0.1})


def test_img2img_resize_by_scale(page, server, tmp_path):
    base.stripes(tmp_path / "stripes.png")
    page.get_by_role("tab", name="img2img", exact=True).click()
    page.locator("#img2img-image input[type=file]").set_input_files(str(tmp_path / "stripes.png"))
    page.locator("#img2img-image img").first.wait_for()
    page.locator("#img2img-size-from label", has_text="Resize by").click()
    set_number(page, "img2img-resize-by", 1.5)
    page.wait_for_function("document.querySelector('#img2img-resize-by-size')?.innerText.includes('96x96')")
    assert "64x64 \u2192 96x96" in page.locator("#img2img-resize-by-size").inner_text()
    set_number(page, "img2img-steps", 2)
    page.fill("#img2img-prompt textarea", "stripes, larger")
    page.click("#img2img-generate")
    info = wait_result(page, "img2img")
    assert "Size: 96x96" in info, info
    assert gallery_image(page, server, "img2img").size == (96, 96)


def newest_inputs(server):
    folders = sorted((server.context.data_dir / "job-inputs").glob("*"), key=lambda f: f.stat().st_mtime)
    return folders[-1]


def draw_stroke(page, editor: str) -> None:
    canvas = page.locator(f"#{editor} canvas").first
    canvas.scroll_into_view_if_needed()
    frame = canvas.bounding_box()
    x = frame["x"] + frame["width"] * 0.5
    page.mouse.move(x, frame["y"] + frame["height"] * 0.3)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x, frame["y"] + frame["height"] * (0.3 + 0.04 * i))
    page.mouse.up()


def test_sketch_and_inpaint_sketch(page, server, tmp_path):
    """Sketch: the drawing is part of the init image; inpaint sketch: it is also the mask."""
    original = np.asarray(base.stripes(tmp_path / "stripes.png"), dtype=np.int16)
    page.get_by_role("tab", name="img2img", exact=True).click()
    for mode, editor in (("Sketch", "img2img-sketch"), ("Inpaint sketch", "img2img-inpaint-sketch")):
        page.get_by_role("tab", name=mode, exact=True).click()
        upload = page.locator(f"#{editor} input[type=file]")
        upload.wait_for(state="attached")
        time.sleep(0.5)  # the editor's canvas settles after the tab opens (as in test_webui_browser's inpaint)
        upload.set_input_files(str(tmp_path / "stripes.png"))
        page.wait_for_function("e => !document.querySelector('#' + e).innerText.includes('Upload an image')",
                               arg=editor, timeout=60_000)
        time.sleep(0.5)
        draw_stroke(page, editor)
        for elem, value in (("img2img-width", 64), ("img2img-height", 64), ("img2img-steps", 2)):
            set_number(page, elem, value)
        page.fill("#img2img-prompt textarea", f"{mode} test")
        page.click("#img2img-generate")
        base.wait_text(page, "#img2img-infotext", f"{mode} test\n", timeout=120)
        folder = newest_inputs(server)
        init = np.asarray(Image.open(folder / "init_images-0.png").convert("RGB"), dtype=np.int16)
        drawn = np.abs(init - original).max(axis=2) > 30
        assert drawn.sum() > 20, "the drawing did not reach the init image"
        mask_path = folder / "mask-0.png"
        if mode == "Sketch":
            assert not mask_path.exists()
        else:
            mask = np.asarray(Image.open(mask_path).convert("L")) > 0
            assert mask.any() and (mask[drawn]).mean() > 0.9, "the strokes are not the mask"
        page.screenshot(path=str(screenshot_dir() / f"a1111-{editor}.png"))
