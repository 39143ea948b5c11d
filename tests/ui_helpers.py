"""The real server with the web UI on 127.0.0.1, and Debian's chromium driven by PyPI playwright."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from tests.api_server import RunningServer, free_port, models_dir_with

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def screenshot_dir() -> Path:
    """Where browser tests save screenshots (ATELIER_TEST_OUTPUT, default test-output/ in the repo)."""
    folder = Path(os.environ.get("ATELIER_TEST_OUTPUT", REPO / "test-output")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def require_browser():
    """playwright's sync API and the chromium binary, or skip (test.sh installs both)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return playwright


def start_ui_server(tmp_path: Path, checkpoints: dict[str, Path] | None = None,
                    settings_overrides: dict | None = None, **config) -> RunningServer:
    """The server with the web UI; `settings_overrides` go to Settings (e.g. lora_dirs), `config` to ServerConfig."""
    import uvicorn

    from modules.app import build_app
    from modules.server.app import create_app
    from modules.server.config import ServerConfig
    from modules.server.context import build_context
    from modules.settings import Settings
    from modules.ui.mount import mount_webui

    models = models_dir_with(tmp_path, checkpoints or {})
    options = dict(models_dir=models, outputs_dir=tmp_path / "outputs", data_dir=tmp_path / "data",
                   device="cpu", precision="fp32", max_size=1024, extensions_dirs=())
    settings = Settings(**{**options, **(settings_overrides or {})})
    port = free_port()
    ctx = build_context(build_app(settings), ServerConfig(port=port, api=True, **config))
    app = create_app(ctx, mount_webui)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the UI server did not start")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", port, ctx, server, thread)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def chromium_version() -> str:
    return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()


@contextmanager
def guarded_page(browser, base: str, width: int = 1400, height: int = 1000) -> Iterator:
    """A page in a fresh browser context; on exit the context closes and no request may have left `base`."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    outside: list[str] = []
    external_request_guard(page, outside, base)
    yield page
    context.close()
    assert not outside, f"requests left 127.0.0.1: {outside}"


def external_request_guard(page, seen: list[str], base: str) -> None:
    """Record any request that leaves 127.0.0.1 (there must be none)."""
    def check(request) -> None:
        url = request.url
        if not url.startswith((base, "data:", "blob:")):
            seen.append(url)

    page.on("request", check)


def open_img2img_mode(page, name: str) -> None:
    """Click an img2img mode tab; the modes that do not fit the column sit in Gradio's overflow menu."""
    tab = page.get_by_role("tab", name=name, exact=True)
    if not tab.is_visible():
        page.locator("#img2img-modes .overflow-menu button").first.click()
        tab = page.locator("#img2img-modes .overflow-dropdown button", has_text=name)
    tab.click()


def act_as_the_update_arrives(page, release_worker: Callable[[], object], applied: str, act: Callable[[], T]) -> T:
    """Frees the busy worker, then runs `act` (the user's change) the moment the model's update arrives. The
    page's round trips to the server (if it makes any to apply the update) are held until the user has acted,
    so the change lands between the apply step reading the fields and writing them back. `applied`: a JS
    expression, true once the page has applied the update. Returns what `act` returns."""
    held: list = []
    page.wait_for_timeout(1000)  # the user's earlier round trips (if the page makes any) are not the ones to hold
    page.route("**/run/**", lambda route: held.append(route))
    release_worker()
    deadline = time.monotonic() + 180
    while not held and not page.evaluate(applied):
        assert time.monotonic() < deadline, "the model's update never arrived"
        page.wait_for_timeout(50)
    result = act()
    page.wait_for_timeout(500)  # the change's own events (key up, a slider's release) settle first
    for route in held:
        route.continue_()
    page.unroute("**/run/**")
    return result


def press_slider(page, elem_id: str, key: str = "ArrowRight") -> str:
    """Moves slider `elem_id` one step with the keyboard; returns its new value."""
    field = page.locator(f"#{elem_id} input").first
    before = field.input_value()
    page.locator(f"#{elem_id} input[type=range]").focus()
    page.keyboard.press(key)
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value !== v", arg=[elem_id, before])
    return field.input_value()


def wait_all_applied(page, applied: str) -> None:
    """The page load's update and the checkpoint change's have both run (`applied` is true); nothing else comes."""
    page.wait_for_function(applied, timeout=180_000)
    time.sleep(1.0)
    page.wait_for_function(applied, timeout=180_000)
