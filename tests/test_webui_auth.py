"""The web UI behind --gradio-auth, with no checkpoint: login required, readable errors, safe file routes."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.ui_helpers import launch_browser, require_browser, screenshot_dir, start_ui_server

pytestmark = pytest.mark.slow
AUTH = ("alice", "s3cret:pw")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    running = start_ui_server(tmp_path_factory.mktemp("webui-auth"), {}, gradio_auth=(AUTH,))
    (running.context.data_dir / "secret.txt").write_text("not for the web")
    yield running
    running.stop()


def test_page_needs_a_login(server):
    assert httpx.get(server.url + "/").status_code == 401
    assert httpx.get(server.url + "/", auth=("alice", "wrong")).status_code == 401
    assert httpx.get(server.url + "/gradio_api/info").status_code == 401
    assert httpx.get(server.url + "/", auth=AUTH).status_code == 200


def test_browser_login_and_no_model_error(server):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        try:
            anonymous = browser.new_context()
            try:  # headless chromium either shows the 401 or aborts the Basic challenge it cannot answer
                assert anonymous.new_page().goto(server.url).status == 401
            except PlaywrightError as err:
                assert "AUTH" in str(err)
            context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                          viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.goto(server.url)
            page.wait_for_selector("#txt2img-generate", timeout=60_000)
            assert "No checkpoint found" in page.locator("#checkpoint-status").inner_text()
            page.fill("#txt2img-prompt textarea", "a cat")
            page.click("#txt2img-generate")
            message = wait_message(page)
            assert "No checkpoint is available" in message and "Traceback" not in message
            page.screenshot(path=str(screenshot_dir() / "no-model-error.png"), full_page=False)
        finally:
            browser.close()


def wait_message(page, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = page.evaluate("(document.querySelector('#txt2img-message [data-testid=markdown]')?.innerText"
                             " || '').trim()")
        if text:
            return text
        time.sleep(0.1)
    raise TimeoutError("no message")


TRAVERSALS = (
    "../../../../etc/passwd",
    "/etc/passwd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "....//....//etc/passwd",
    "..\\..\\..\\etc\\passwd",
    "//etc/passwd",
    "file:///etc/passwd",
)


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_route_refuses_traversal(server, path):
    for prefix in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
        response = httpx.get(server.url + prefix + path, auth=AUTH)
        assert response.status_code in (400, 403, 404, 405), (prefix + path, response.status_code)
        assert "root:" not in response.text


def test_file_route_refuses_app_files(server):
    """Data, models and source files are not served, by absolute or relative path; no login, no file."""
    data = server.context.data_dir
    for target in (data / "secret.txt", data / "jobs.sqlite3", server.context.app.settings.models_dir,
                   "modules/app.py", __file__):
        response = httpx.get(f"{server.url}/gradio_api/file={target}", auth=AUTH)
        assert response.status_code in (403, 404), (target, response.status_code)
    assert httpx.get(f"{server.url}/gradio_api/file={data / 'secret.txt'}").status_code == 401


@pytest.mark.parametrize("path", ["/config", "/gradio_api/info", "/gradio_api/config", "/gradio_api/upload",
                                  "/gradio_api/queue/data?session_hash=x", "/file=/etc/passwd",
                                  "/gradio_api/file=/etc/passwd", "/openapi.json", "/docs", "/assets/index.js",
                                  "/theme.css", "/sdapi/v1/options", "/api/v1/jobs", "/api/v1/health"])
def test_every_ui_route_needs_a_login(server, path):
    for method in ("GET", "POST"):
        response = httpx.request(method, server.url + path)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server.url + "/config", auth=AUTH).status_code == 200
