"""DNS rebinding and cross-site requests, over real HTTP against the real server (issue 23, items 2 and 3)."""
from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from modules.server.config import ServerConfig, StartupRefused
from modules.server.origin import OriginPolicyMiddleware, same_origin, split_host
from tests.api_server import start_server

USERS = (("alice", "a-pass"), ("root", "r-pass"))
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("origin"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("origin-cors"), cors_allow_origins=("https://app.example",),
                       cors_allow_origins_regex=r"https://.*\.trusted\.example", allowed_hosts=("sd.lan",))
    yield srv
    srv.stop()


def host(srv, name: str) -> dict[str, str]:
    return {"Host": f"{name}:{srv.port}"}


def test_rebound_host_names_are_refused(server):
    for path in ("/api/v1/health", "/sdapi/v1/options", "/docs"):
        response = httpx.get(server.url + path, headers=host(server, "evil.example"))
        assert response.status_code == 400, path
        assert "evil.example" in response.json()["detail"] and "--allowed-hosts" in response.json()["detail"]
    install = httpx.post(server.url + "/api/v1/extensions/install", json={"url": "https://example.invalid/x"},
                         headers=host(server, "evil.example"))
    assert install.status_code == 400 and "DNS rebinding" in install.json()["detail"]
    for name in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]"):
        assert httpx.get(server.url + "/api/v1/health", headers=host(server, name)).status_code == 200, name


def test_allowed_hosts_add_names(cors_server):
    assert httpx.get(cors_server.url + "/api/v1/health", headers=host(cors_server, "sd.lan")).status_code == 200
    assert httpx.get(cors_server.url + "/api/v1/health", headers={"Host": "sd.lan"}).status_code == 200
    assert httpx.get(cors_server.url + "/api/v1/health", headers=host(cors_server, "evil.sd.lan")).status_code == 400
    assert httpx.get(cors_server.url + "/api/v1/health", headers=host(cors_server, "localhost")).status_code == 200


def test_listen_accepts_any_host_behind_auth(tmp_path):
    srv = start_server(tmp_path, listen=True, api_auth=USERS)
    try:
        headers = host(srv, "sd.example.org")
        assert httpx.get(srv.url + "/api/v1/health", headers=headers).status_code == 401
        assert httpx.get(srv.url + "/api/v1/health", headers=headers, auth=USERS[0]).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/unload-checkpoint",
                                  "/sdapi/v1/reload-checkpoint", "/sdapi/v1/refresh-checkpoints",
                                  "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras"])
def test_cross_site_simple_posts_are_refused(server, path):
    """A text/plain form POST from another origin (no preflight) must not run the route."""
    for origin in (EVIL, "http://localhost:9999", f"http://127.0.0.1:{server.port + 1}", "null"):
        response = httpx.post(server.url + path, content=b"", headers={"Origin": origin,
                                                                      "Content-Type": "text/plain"})
        assert response.status_code == 403, (path, origin)
        assert "Cross-site request refused" in response.json()["detail"]
        assert "--cors-allow-origins" in response.json()["detail"]
    no_origin = httpx.post(server.url + path, content=b"", headers={"Sec-Fetch-Site": "cross-site"})
    assert no_origin.status_code == 403


def test_same_origin_and_api_clients_keep_working(server):
    own = httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": server.url})
    assert own.status_code == 200
    assert httpx.post(server.url + "/sdapi/v1/interrupt").status_code == 200  # webuiapi sends no Origin
    assert httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert httpx.get(server.url + "/sdapi/v1/options", headers={"Origin": EVIL}).status_code == 200  # reads pass


def test_no_cross_origin_reads_without_the_cors_flags(server):
    for origin in (EVIL, "http://localhost:9999"):
        read = httpx.get(server.url + "/sdapi/v1/options", headers={"Origin": origin})
        assert "access-control-allow-origin" not in read.headers
        preflight = httpx.options(server.url + "/sdapi/v1/options", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_flags_let_named_origins_call_and_read(cors_server):
    for origin in ("https://app.example", "https://ui.trusted.example"):
        headers = {"Origin": origin, **host(cors_server, "127.0.0.1")}
        posted = httpx.post(cors_server.url + "/sdapi/v1/interrupt", headers=headers)
        assert posted.status_code == 200, origin
        assert posted.headers["access-control-allow-origin"] == origin
        assert posted.headers["access-control-allow-credentials"] == "true"
        preflight = httpx.options(cors_server.url + "/sdapi/v1/options", headers={
            **headers, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    other = httpx.post(cors_server.url + "/sdapi/v1/interrupt", headers={"Origin": "https://trusted.example.evil"})
    assert other.status_code == 403
    read = httpx.get(cors_server.url + "/sdapi/v1/options", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in read.headers


def _ws_app(**policy) -> TestClient:
    async def echo(websocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = OriginPolicyMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]),
                                 frozenset({"testserver"}), **policy)
    return TestClient(app)  # websockets go to ws://testserver


def test_websocket_upgrades_check_the_origin():
    client = _ws_app()
    with client.websocket_connect("/ws", headers={"Origin": "http://testserver"}) as ws:
        assert ws.receive_text() == "hello"
    with client.websocket_connect("/ws") as ws:  # no Origin: not a browser
        assert ws.receive_text() == "hello"
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws", headers={"Origin": EVIL}):
        pass
    allowed = _ws_app(allow_origins=("http://evil.example",))
    with allowed.websocket_connect("/ws", headers={"Origin": EVIL}) as ws:
        assert ws.receive_text() == "hello"


def test_host_and_origin_parsing():
    assert split_host("[::1]:7860") == ("::1", "7860") and split_host("Example.COM") == ("example.com", None)
    assert same_origin("https://sd.example", "sd.example:443") and same_origin("http://a:80", "a")
    assert not same_origin("http://localhost:1", "localhost:2") and not same_origin("null", "localhost")
    assert not same_origin("https://a.example", "a.example:80")
    assert ServerConfig(listen=True).accepted_hosts is None
    assert ServerConfig(listen=True, allowed_hosts=("sd.lan",)).accepted_hosts == {
        "127.0.0.1", "localhost", "::1", "sd.lan"}
    assert "192.168.1.5" in ServerConfig(server_name="192.168.1.5").accepted_hosts
    assert ServerConfig(allowed_hosts=("*",)).accepted_hosts is None
    with pytest.raises(StartupRefused, match="cors-allow-origins-regex"):
        ServerConfig(cors_allow_origins_regex="(").check_startup()
