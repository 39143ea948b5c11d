"""Browser tests of the web UI: Debian chromium + playwright against the real server on 127.0.0.1.

One server and one browser per module; images are 64x64 with a few steps so the set stays quick.
"""
from __future__ import annotations

import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from modules.ui.img2img import brush_size
from tests.ui_helpers import (
    guarded_page,
    launch_browser,
    require_browser,
    screenshot_dir,
    start_ui_server,
)

pytestmark = pytest.mark.slow
STEP = re.compile(r"Step (\d+)/(\d+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    running = start_ui_server(tmp_path_factory.mktemp("webui"), {"tiny": tiny_checkpoints["sd1"]})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    with guarded_page(browser, server.url) as page:
        open_ui(page, server.url)
        yield page


def open_ui(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#txt2img-generate", timeout=60_000)
    page.wait_for_function("document.querySelector('#checkpoint input')?.value.startsWith('tiny')", timeout=30_000)
    # the model's native size is applied once it has loaded; typing before then could be overwritten
    page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def set_number_settled(page, elem_id: str, value, tries: int = 5) -> None:
    """set_number, again while the widget falls back to its old value (re-rendered on an accordion's first open)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(tries):
        set_number(page, elem_id, value)
        time.sleep(0.5)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"{elem_id} keeps {box.input_value()!r}, not {value!r}")


def settle_native_size(page) -> None:
    """Wait until no native-size update is in flight, twice a second apart: a checkpoint switch (the
    user's, or the one the page load causes) starts another update, which could overwrite typed sizes."""
    for _ in range(2):
        page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)
        time.sleep(1.0)
    page.wait_for_function("document.body.dataset.nativeSize === 'applied'", timeout=120_000)


def fill_txt2img(page, prompt: str, seed: int, steps: int, size: int = 64) -> None:
    page.fill("#txt2img-prompt textarea", prompt)
    settle_native_size(page)
    for elem in ("txt2img-width", "txt2img-height"):
        set_number_settled(page, elem, size)
    set_number(page, "txt2img-steps", steps)
    page.locator("#txt2img-seed input").fill(str(seed))
    page.locator("#txt2img-seed input").press("Tab")


def text_at(page, selector: str) -> str:
    """innerText of the first match, or "" (never waits: outputs are re-rendered while a job runs)."""
    return page.evaluate("s => (document.querySelector(s)?.innerText || '').trim()", selector)


def progress_text(page, tab: str = "txt2img") -> str:
    return text_at(page, f"#{tab}-progress .atelier-progress-text")


def progress_bar(page, tab: str = "txt2img") -> tuple[str, str | None]:
    """(text, data-percent) of the progress bar, read in one go."""
    return tuple(page.evaluate("""s => { const bar = document.querySelector(s);
        return [(bar?.innerText || '').trim(), bar?.getAttribute('data-percent') ?? null]; }""",
                               f"#{tab}-progress .atelier-progress"))


def infotext_of(page, tab: str = "txt2img") -> str:
    return text_at(page, f"#{tab}-infotext pre")


def message_of(page, tab: str = "txt2img") -> str:
    return text_at(page, f"#{tab}-message [data-testid=markdown]")


def wait_result(page, tab: str = "txt2img", timeout: float = 90) -> str:
    """Wait for the job to end; returns the infotext (or the message when there is no image)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        seen = infotext_of(page, tab), message_of(page, tab)
        info, message = seen
        final = info or (message and not message.startswith("⏹ Interrupting"))
        if final and seen == last:  # the same twice: the message and infotext may render a frame apart
            return info or message
        last = seen
        time.sleep(0.2)
    raise TimeoutError(f"{tab}: no result; progress {progress_text(page, tab)!r}")


def wait_running(page, tab: str = "txt2img", timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = STEP.search(progress_text(page, tab))
        if match and int(match.group(1)) >= 1:
            return int(match.group(1))
        time.sleep(0.1)
    raise TimeoutError(f"{tab} never started: {progress_text(page, tab)!r}")


def gallery_image(page, server, tab: str) -> Image.Image:
    src = page.locator(f"#{tab}-gallery img").first.get_attribute("src")
    response = httpx.get(src if src.startswith("http") else server.url + src, timeout=10)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_txt2img_generate_with_progress_preview_and_seed(page, server):
    fill_txt2img(page, "a red fox in the snow", seed=1234, steps=40)  # long enough to watch the bar move
    assert page.locator("#txt2img-token-counter").inner_text().strip() == "6/75"
    page.click("#txt2img-generate")
    steps_seen, preview_seen, widths = set(), False, set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not infotext_of(page):
        text, percent = progress_bar(page)  # one read: the bar empties when the job ends
        match = STEP.search(text)
        if match:
            steps_seen.add(int(match.group(1)))
            assert "ETA" in text
            widths.add(percent)
        preview_seen = preview_seen or page.locator("#txt2img-preview img").count() > 0
        time.sleep(0.05)
    info = infotext_of(page)
    assert "Seed: 1234" in info and "Size: 64x64" in info and "Steps: 40" in info
    assert len(steps_seen) >= 2 and len(widths) >= 2, (steps_seen, widths)  # the bar moved
    assert preview_seen, "no live preview appeared"
    assert page.locator("#txt2img-gallery img").count() >= 1
    assert gallery_image(page, server, "txt2img").size == (64, 64)
    page.screenshot(path=str(screenshot_dir() / "txt2img.png"), full_page=True)


def test_interrupt_is_per_user_and_results_are_private(browser, server):
    """Two browsers: B's Interrupt leaves A's job alone, A's Interrupt stops A's long job, B gets its own image."""
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        pages.append(context.new_page())
        open_ui(pages[-1], server.url)
    a, b = pages
    fill_txt2img(a, "long job of A", seed=111, steps=150)
    fill_txt2img(b, "short job of B", seed=222, steps=3)
    a.click("#txt2img-generate")
    first = wait_running(a)
    b.click("#txt2img-interrupt")
    assert "no running job" in wait_message(b)
    b.click("#txt2img-generate")
    wait_text(b, "#txt2img-progress .atelier-progress-text", "ahead of you")
    assert STEP.search(progress_text(a)) and wait_running(a) >= first  # A still runs after B's Interrupt
    b.screenshot(path=str(screenshot_dir() / "txt2img-queued.png"), full_page=False)
    a.click("#txt2img-interrupt")
    a_result = wait_result(a)
    assert "Seed: 111" in a_result and "Steps: 150" in a_result
    assert "Interrupted" in message_of(a)
    b_result = wait_result(b)
    assert "Seed: 222" in b_result and "Seed: 111" not in b_result
    assert "Seed: 222" not in infotext_of(a)
    for page in pages:
        page.context.close()


def wait_message(page, tab: str = "txt2img", timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = message_of(page, tab)
        if text:
            return text
        time.sleep(0.1)
    raise TimeoutError("no message")


def wait_text(page, selector: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in text_at(page, selector):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{selector} never showed {text!r}: {text_at(page, selector)!r}")


def stripes(path) -> Image.Image:
    image = Image.new("RGB", (64, 64), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for x in range(0, 64, 8):
        draw.rectangle([x, 0, x + 3, 63], fill=(200, 40 + x * 3, 90))
    image.save(path)
    return image


def test_inpaint_mask_stroke_keeps_pixels_outside(page, server, tmp_path):
    original = stripes(tmp_path / "stripes.png")
    page.get_by_role("tab", name="img2img", exact=True).first.click()
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    upload = page.locator("#inpaint-editor input[type=file]")
    upload.wait_for(state="attached")
    time.sleep(0.5)
    with page.expect_response(lambda r: r.url.endswith("/run/predict"), timeout=30_000):  # the brush fits the image
        upload.set_input_files(str(tmp_path / "stripes.png"))
    page.wait_for_function("!document.querySelector('#inpaint-editor').innerText.includes('Upload an image')")
    wait_brush_size(page, brush_size(original))
    canvas = page.locator("#inpaint-editor canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x = box["x"] + box["width"] * 0.5 + 150  # a vertical stroke near the right edge
    page.mouse.move(x, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x, box["y"] + box["height"] * (0.3 + 0.04 * i))
    page.mouse.up()
    for elem, value in (("img2img-width", 64), ("img2img-height", 64), ("img2img-steps", 4),
                        ("img2img-denoising", 1)):
        set_number(page, elem, value)
    page.click("#img2img-inpaint-options")  # open the accordion; no blur: the mask edge is exact
    page.locator("#img2img-mask-blur input[type=number]").wait_for(state="visible")
    set_number_settled(page, "img2img-mask-blur", 0)
    time.sleep(0.3)
    page.fill("#img2img-prompt textarea", "a blue stone")
    page.screenshot(path=str(screenshot_dir() / "inpaint-stroke.png"), full_page=False)
    assert page.locator("#img2img-mask-blur input[type=number]").input_value() == "0"
    page.click("#img2img-generate")
    info = wait_result(page, "img2img")
    assert "Denoising strength: 1" in info and "Seed:" in info, info
    result = gallery_image(page, server, "img2img")
    assert result.size == (64, 64)
    from modules.jobs.model import Caller

    last = server.context.jobs.list(Caller("test", admin=True), owner=None, limit=1)[0]
    assert last.params["params"]["mask_blur"] == 0, last.params["params"]["mask_blur"]
    mask = stored_mask(server)  # what the stroke became on the server: white = repaint
    assert mask is not None and mask.size == (64, 64)
    left, _, right, _ = mask.getbbox()
    assert left >= 16, f"the stroke should cover the right part only, mask bbox {mask.getbbox()}"
    assert right - left <= 12, f"the brush should be about 6 px wide on a 64 px image, mask bbox {mask.getbbox()}"
    changed = _changed(result, original)
    Image.fromarray(changed.astype("uint8") * 255).resize((256, 256)).save(
        screenshot_dir() / "inpaint-changed-pixels.png")
    assert changed.any(), "the stroke repainted nothing"
    outside = ~(np.asarray(mask) > 0)
    assert not (changed & outside).any(), f"{int((changed & outside).sum())} pixels outside the stroke changed"
    assert changed[~outside].mean() > 0.5, "most of the stroke should be repainted"
    page.screenshot(path=str(screenshot_dir() / "inpaint-result.png"), full_page=True)


def wait_brush_size(page, size: int) -> None:
    """Open the editor's Brush Size control, wait until it shows `size`, and close it again."""
    control = page.locator("#inpaint-editor button[aria-label='Brush Size']").first
    control.click()
    page.wait_for_function("s => document.querySelector('#inpaint-editor input[type=range]')?.value === s",
                           arg=str(size), timeout=30_000)
    control.click()
    time.sleep(0.3)


def stored_mask(server) -> Image.Image | None:
    """The mask of the newest job, as the server stored it beside the job."""
    folders = sorted((server.context.data_dir / "job-inputs").glob("*"), key=lambda f: f.stat().st_mtime)
    path = folders[-1] / "mask-0.png" if folders else None
    return Image.open(path).convert("L") if path and path.exists() else None


def _changed(a: Image.Image, b: Image.Image):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2) > 2


def test_pnginfo_send_to_txt2img_fills_fields(page, tmp_path):
    from modules import images

    text = ("pnginfo prompt, (sharp:1.1)\nNegative prompt: blurry\nSteps: 13, Sampler: Euler a, "
            "Schedule type: Karras, CFG scale: 5.5, Seed: 777, Size: 128x96, Model hash: 0000000000, Model: tiny")
    path = images.save_image(Image.new("RGB", (32, 32), "gray"), tmp_path, 777, text)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(path))
    wait_text(page, "#pnginfo-table", "Euler a")
    page.screenshot(path=str(screenshot_dir() / "pnginfo.png"), full_page=True)
    page.click("#pnginfo-send-to-txt2img")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value.startsWith('pnginfo')")
    assert page.locator("#txt2img-prompt textarea").input_value() == "pnginfo prompt, (sharp:1.1)"
    assert page.locator("#txt2img-negative-prompt textarea").input_value() == "blurry"
    assert page.locator("#txt2img-seed input").input_value() == "777"
    assert page.locator("#txt2img-sampler input").input_value() == "Euler a"
    assert page.locator("#txt2img-scheduler input").input_value() == "Karras"
    assert page.locator("#txt2img-steps input[type=number]").input_value() == "13"
    assert page.locator("#txt2img-width input[type=number]").input_value() == "128"
    assert page.locator("#txt2img-height input[type=number]").input_value() == "96"


def test_read_parameters_button_and_bad_size(page):
    page.fill("#txt2img-prompt textarea", "cat\nSteps: 9, Sampler: Euler, Seed: 55, Size: 64x64")
    page.click("#txt2img-read-params")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value === 'cat'")
    assert page.locator("#txt2img-seed input").input_value() == "55"
    set_number(page, "txt2img-width", 100)
    page.click("#txt2img-generate")
    message = wait_message(page)
    assert "width must be a multiple of 8" in message and "Traceback" not in message


def test_every_tab_renders(page):
    for name in ("img2img", "PNG Info", "History", "Settings", "Extensions"):
        page.get_by_role("tab", name=name, exact=True).first.click()
        time.sleep(0.5)
        page.screenshot(path=str(screenshot_dir() / f"tab-{name.lower().replace(' ', '-')}.png"), full_page=True)
    assert page.locator("#extensions-table").count() == 1
    assert page.locator("#settings-save").count() == 1
