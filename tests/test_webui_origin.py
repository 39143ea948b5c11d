"""The web UI (Gradio) on the real server: Gradio's own localhost CORS must not let another
localhost origin read responses, and cross-site state changes are refused (issue 23, item 2)."""
from __future__ import annotations

import httpx
import pytest

from tests.ui_helpers import start_ui_server

pytestmark = pytest.mark.slow
OTHER_LOCAL = ("http://localhost:9999", "http://127.0.0.1:1")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_ui_server(tmp_path_factory.mktemp("webui-origin"), {})
    yield running
    running.stop()


@pytest.mark.parametrize("path", ["/", "/config", "/gradio_api/info", "/sdapi/v1/options"])
def test_other_localhost_origins_cannot_read(server, path):
    for origin in OTHER_LOCAL:
        read = httpx.get(server.url + path, headers={"Origin": origin})
        assert read.status_code == 200, (path, read.status_code)
        assert "access-control-allow-origin" not in read.headers, (path, origin)
        assert "access-control-allow-credentials" not in read.headers
        preflight = httpx.options(server.url + path, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers, (path, origin)


def test_gradio_queue_refuses_cross_site_joins(server):
    join = {"data": [], "fn_index": 0, "session_hash": "x"}
    for origin in (*OTHER_LOCAL, "http://evil.example"):
        response = httpx.post(server.url + "/gradio_api/queue/join", json=join, headers={"Origin": origin})
        assert response.status_code == 403, origin
    own = httpx.post(server.url + "/gradio_api/queue/join", json=join, headers={"Origin": server.url})
    assert own.status_code != 403
    rebound = httpx.get(server.url + "/config", headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 400
