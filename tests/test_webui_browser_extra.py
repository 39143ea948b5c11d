"""Browser tests of History's send-to buttons and the extra-networks cards (LoRA / TI), on a server
with a temporary --lora-dir and embeddings; same helpers and browser as tests/test_webui_browser.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests import test_webui_browser as base
from tests.fixtures import make_tiny_lora as mk
from tests.test_webui_browser import fill_txt2img, open_ui, wait_result, wait_text
from tests.ui_helpers import REPO, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
LAYERS = {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1, 1)}
CARDS = "#txt2img-ext-extra-networks"
browser, page = base.browser, base.page  # the same fixtures, bound to this module's server


def write_lora(folder: Path, name: str, weight: float | None = None) -> Path:
    path = mk.write(mk.lora_tensors(LAYERS), folder / f"{name}.safetensors")
    if weight is not None:
        path.with_suffix(".json").write_text(json.dumps({"preferred weight": weight}))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    root = tmp_path_factory.mktemp("webui-extra")
    loras = root / "my-loras"
    write_lora(loras, "inky", weight=0.7)
    Image.new("RGB", (256, 256), (40, 90, 200)).save(loras / "inky.preview.png")
    write_lora(loras, "plain")
    embeddings = root / "models" / "embeddings"
    embeddings.mkdir(parents=True)
    save_file({"emb_params": torch.zeros(2, 32)}, str(embeddings / "twin.safetensors"))
    running = start_ui_server(root, {"tiny": tiny_checkpoints["sd1"]}, settings_overrides={
        "lora_dirs": (loras,), "extensions_dirs": (REPO / "extensions",), "extensions_allow": ("lora",)})
    running.lora_dir = loras
    yield running
    running.stop()


def prompt_of(page, tab: str = "txt2img") -> str:
    return page.locator(f"#{tab}-prompt textarea").input_value()


def test_history_send_to_txt2img_and_img2img(page, server):
    fill_txt2img(page, "history heron at dawn", seed=4242, steps=3)
    page.click("#txt2img-generate")
    assert "Seed: 4242" in wait_result(page)
    open_ui(page, server.url)  # a fresh page: every field back to its default (same session)
    assert prompt_of(page) == ""
    page.get_by_role("tab", name="History", exact=True).click()
    page.locator("#history-table [role=gridcell]:visible", has_text="history heron").first.click()
    wait_text(page, "#history-infotext", "Seed: 4242")
    page.screenshot(path=str(screenshot_dir() / "history-selected.png"), full_page=True)
    page.click("#history-send-to-txt2img")
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value.startsWith('history')")
    assert page.locator("#txt2img-prompt textarea").is_visible(), "send-to did not switch to txt2img"
    assert prompt_of(page) == "history heron at dawn"
    assert page.locator("#txt2img-seed input").input_value() == "4242"
    assert page.locator("#txt2img-steps input[type=number]").input_value() == "3"
    assert page.locator("#txt2img-width input[type=number]").input_value() == "64"
    page.get_by_role("tab", name="History", exact=True).click()
    page.click("#history-send-to-img2img")
    page.wait_for_function("document.querySelector('#img2img-prompt textarea')?.value.startsWith('history')")
    assert page.locator("#img2img-prompt textarea").is_visible(), "send-to did not switch to img2img"
    assert page.locator("#img2img-seed input").input_value() == "4242"
    page.locator("#img2img-image img").first.wait_for(state="visible", timeout=10_000)
    page.screenshot(path=str(screenshot_dir() / "history-sent-to-img2img.png"), full_page=True)


def open_cards(page, kind: str) -> None:
    page.click(f"{CARDS} button:has-text('Extra networks')")
    open_cards_tab(page, kind)


def open_cards_tab(page, kind: str) -> None:
    page.locator(f"{CARDS} button[role=tab]", has_text=kind).click()


def card(page, name: str):
    return page.locator(f"{CARDS} .atelier-card:visible", has_text=name)


def test_cards_insert_tags_at_preferred_weight(page):
    page.fill("#txt2img-prompt textarea", "a cat")
    open_cards(page, "Lora")
    card(page, "inky").click()
    page.wait_for_function("document.querySelector('#txt2img-prompt textarea').value.includes('<lora:')",
                           timeout=5_000)
    assert prompt_of(page) == "a cat <lora:inky:0.7>"
    card(page, "plain").click()
    assert prompt_of(page) == "a cat <lora:inky:0.7> <lora:plain:1>"
    preview = card(page, "inky").locator("img")
    preview.evaluate("img => img.decode()")  # served by /ext/lora/preview, drawn inside its card
    assert preview.evaluate("img => img.naturalWidth") == 256
    assert preview.bounding_box()["width"] <= card(page, "inky").bounding_box()["width"]
    page.screenshot(path=str(screenshot_dir() / "txt2img-lora-cards.png"), full_page=True)
    open_cards_tab(page, "Textual Inversion")
    card(page, "twin").click()
    assert prompt_of(page) == "a cat <lora:inky:0.7> <lora:plain:1> twin"
    for elem, value in (("txt2img-width", 64), ("txt2img-height", 64), ("txt2img-steps", 2)):
        base.set_number(page, elem, value)
    page.click("#txt2img-generate")  # the server got the typed-in tags: they are in the job's infotext
    info = wait_result(page)
    assert "<lora:inky:0.7>" in info and "Lora hashes: \"inky: " in info and "TI hashes: \"twin: " in info, info


def test_card_search_and_refresh(page, server):
    open_cards(page, "Lora")
    search = page.locator("#txt2img-en-lora-search textarea, #txt2img-en-lora-search input").first
    assert card(page, "inky").count() == 1 and card(page, "plain").count() == 1
    search.fill("ink")
    wait_gone(page, "plain")
    assert card(page, "inky").count() == 1
    search.fill("nothing-matches")
    wait_text(page, CARDS, "Nothing here")
    search.fill("")
    card(page, "plain").wait_for(timeout=5_000)
    write_lora(server.lora_dir / "late", "newcomer", weight=0.5)
    assert card(page, "newcomer").count() == 0
    page.locator(f"{CARDS} button:visible", has_text="Refresh").first.click()
    card(page, "newcomer").wait_for(timeout=10_000)
    card(page, "newcomer").click()
    assert prompt_of(page).endswith("<lora:late/newcomer:0.5>")


def wait_gone(page, name: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while card(page, name).count():
        if time.monotonic() > deadline:
            raise TimeoutError(f"card {name!r} is still shown")
        time.sleep(0.1)
