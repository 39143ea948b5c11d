"""Browser test of the Script dropdown: pick X/Y/Z plot in txt2img, generate, and the grid appears first
in the gallery with the cells after it; SD upscale is offered in img2img only. Same helpers and browser
as tests/test_webui_browser.py, on a server with the bundled script extensions."""
from __future__ import annotations

import pytest

from tests import test_webui_browser as base
from tests.test_webui_browser import fill_txt2img, gallery_image, wait_result
from tests.ui_helpers import REPO, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
browser, page = base.browser, base.page  # the same fixtures, bound to this module's server
SCRIPTS = ("xyz-grid", "prompt-matrix", "prompts-from-file", "sd-upscale", "loopback")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    require_browser()
    running = start_ui_server(tmp_path_factory.mktemp("webui-scripts"), {"tiny": tiny_checkpoints["sd1"]},
                              settings_overrides={"extensions_dirs": (REPO / "extensions",),
                                                  "extensions_allow": SCRIPTS})
    yield running
    running.stop()


def choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(option)  # filters the list down to the option
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()


def options_of(page, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").click()
    names = [o.strip().splitlines()[-1] for o in page.locator(f"#{elem_id}").get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    page.locator(f"#{elem_id} input").blur()
    return names


def test_xyz_plot_from_the_script_dropdown_shows_a_grid(page, server):
    assert not page.locator("#txt2img-script-x-y-z-plot").is_visible()
    assert "SD upscale" not in options_of(page, "txt2img-script")
    fill_txt2img(page, "a grid of foxes", seed=77, steps=2)
    choose(page, "txt2img-script", "X/Y/Z plot")
    page.locator("#txt2img-script-x-y-z-plot").wait_for(state="visible")
    choose(page, "txt2img-script-x-y-z-plot-x_type", "Steps")
    page.locator("#txt2img-script-x-y-z-plot-x_values textarea").fill("1, 2")
    choose(page, "txt2img-script-x-y-z-plot-y_type", "CFG Scale")
    page.locator("#txt2img-script-x-y-z-plot-y_values textarea").fill("3, 7")
    page.locator("#txt2img-script-x-y-z-plot-include_lone_images input").check()
    page.click("#txt2img-generate")
    info = wait_result(page)
    assert "Script: X/Y/Z plot" in info and "X Type: Steps" in info and "Y Type: CFG Scale" in info
    assert page.locator("#txt2img-gallery img").count() >= 5  # the grid, then four cells
    grid = gallery_image(page, server, "txt2img")
    assert grid.width == 64 * 3 // 4 + 2 * 64 and grid.height > 2 * 64
    page.screenshot(path=str(screenshot_dir() / "txt2img-xyz.png"), full_page=True)


def test_img2img_offers_its_own_scripts(page):
    page.get_by_role("tab", name="img2img", exact=True).click()
    names = options_of(page, "img2img-script")
    assert {"None", "X/Y/Z plot", "SD upscale", "Loopback"} <= set(names)
    choose(page, "img2img-script", "SD upscale")
    page.locator("#img2img-script-sd-upscale").wait_for(state="visible")
    assert page.locator("#img2img-script-sd-upscale-overlap").is_visible()
    assert not page.locator("#img2img-script-x-y-z-plot").is_visible()


def test_fill_values_buttons_fill_an_axis_with_all_its_values(page):
    """A1111's fill button: a dropdown-type axis's box gets every value (number axes: tests/test_xyz_axes_extra.py)."""
    choose(page, "txt2img-script", "X/Y/Z plot")
    page.locator("#txt2img-script-x-y-z-plot").wait_for(state="visible")
    page.wait_for_function("document.querySelector('#txt2img-script-x-y-z-plot-x_values-fill')"
                           "?.getAttribute('aria-label')?.startsWith('Fill')", timeout=10_000)
    x_box = page.locator("#txt2img-script-x-y-z-plot-x_values textarea")
    choose(page, "txt2img-script-x-y-z-plot-x_type", "Sampler")
    page.click("#txt2img-script-x-y-z-plot-x_values-fill")
    page.wait_for_function("document.querySelector('#txt2img-script-x-y-z-plot-x_values textarea')"
                           ".value.includes('Euler a')", timeout=10_000)
    samplers = [v.strip() for v in x_box.input_value().split(",")]
    assert {"Euler", "Euler a", "DPM++ 2M", "UniPC"} <= set(samplers)
    choose(page, "txt2img-script-x-y-z-plot-y_type", "Checkpoint name")
    page.click("#txt2img-script-x-y-z-plot-y_values-fill")
    page.wait_for_function("document.querySelector('#txt2img-script-x-y-z-plot-y_values textarea')"
                           ".value === 'tiny'", timeout=10_000)
