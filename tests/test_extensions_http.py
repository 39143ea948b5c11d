"""Extension routes and the Extensions API on the real FastAPI app: /ext/<name>/ only,
install refused beyond localhost, admin-only changes, A1111 lists."""
from __future__ import annotations

import subprocess

import pytest
from fastapi.testclient import TestClient

from modules.plugins.install import install_refusal, name_from_url
from tests.plugin_helpers import FIXTURES, ext_app, git_extension_repo, statuses

PLUGINS = ("web-ext", "evil-routes", "style-pack")


def client_for(app, **config) -> TestClient:
    from modules.server.app import create_app
    from modules.server.config import ServerConfig
    from modules.server.context import build_context

    ctx = build_context(app, ServerConfig(**{"api": True, "nowebui": True, **config}))
    return TestClient(create_app(ctx), base_url="http://127.0.0.1")  # no lifespan: no queue needed here


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return ext_app(tmp_path_factory.mktemp("ext-http"), extensions_allow=PLUGINS)


@pytest.fixture
def local_repo(tmp_path):
    return git_extension_repo(tmp_path / "src" / "hello-ext")


def test_extension_routes_are_served_under_their_prefix(app):
    client = client_for(app)
    assert client.get("/ext/web-ext/hello").json() == {"hello": "web-ext"}
    assert client.get("/ext/evil-routes/ok").json() == {"ok": True}


def test_extension_cannot_register_routes_outside_its_prefix(app):
    client = client_for(app)
    evil = app.plugins.extension("evil-routes")
    refusals = {e.message for e in evil.hook_errors if e.hook == "register_api_routes"}
    assert len(refusals) == 3
    assert any("Mount" in r for r in refusals) and any("dot segments" in r for r in refusals)
    assert any("FastAPI" in r for r in refusals)
    fastapi_app = client.app
    for route in fastapi_app.routes:
        module = getattr(getattr(route, "endpoint", None), "__module__", "")
        if module.startswith("atelier_ext_"):
            name = module.removeprefix("atelier_ext_").replace("_", "-")
            assert route.path.startswith(f"/ext/{name}/"), route.path
    assert client.post("/sdapi/v1/txt2img", json={"steps": 0}).status_code == 422  # the real route, not hijacked
    assert "hijacked" not in client.get("/sdapi/v1/options").text


def test_install_route_refuses_when_listening_beyond_localhost(app, local_repo):
    client = client_for(app, listen=True, insecure_no_auth=True, allow_file_extension_install=True)
    response = client.post("/api/v1/extensions/install", json={"url": local_repo})
    assert response.status_code == 403
    assert "--enable-insecure-extension-access" in response.json()["detail"]
    assert client.post("/api/v1/extensions/style-pack/enabled", json={"enabled": False}).status_code == 403
    assert not any(p.name == "hello-ext" for p in app.settings.extensions_dirs[0].iterdir())
    named = client_for(app, server_name="192.168.1.20", insecure_no_auth=True, allow_file_extension_install=True)
    assert named.post("/api/v1/extensions/install", json={"url": local_repo}).status_code == 403


def test_install_policy():
    settings = type("S", (), {"enable_insecure_extension_access": False})()
    assert install_refusal("127.0.0.1", settings) is None and install_refusal("localhost", settings) is None
    assert install_refusal("0.0.0.0", settings) and install_refusal("::", settings)
    settings.enable_insecure_extension_access = True
    assert install_refusal("0.0.0.0", settings) is None
    assert name_from_url("https://example.invalid/me/cool-ext.git") == "cool-ext"
    assert name_from_url("git@example.invalid:me/other") == "other"


def test_install_from_git_on_localhost_then_load_at_next_start(tmp_path, local_repo):
    ext_dir = tmp_path / "exts"
    app = ext_app(tmp_path, dirs=(ext_dir,))
    client = client_for(app, allow_file_extension_install=True)
    response = client.post("/api/v1/extensions/install", json={"url": local_repo})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "hello-ext" and response.json()["restart_required"] is True
    assert (ext_dir / "hello-ext" / "extension.py").is_file()
    assert client.post("/api/v1/extensions/install", json={"url": local_repo}).status_code == 400  # exists
    for bad in ("ext::sh -c touch${IFS}/tmp/pwned", "--upload-pack=touch /tmp/x", "/etc/passwd"):
        assert client.post("/api/v1/extensions/install", json={"url": bad}).status_code == 400
    restarted = ext_app(tmp_path, dirs=(ext_dir,))
    assert statuses(restarted) == {"hello-ext": "loaded"} and "Hello" in restarted.registries.styles


def test_insecure_flag_allows_install_while_listening(tmp_path, local_repo):
    app = ext_app(tmp_path, dirs=(tmp_path / "exts",), enable_insecure_extension_access=True)
    client = client_for(app, listen=True, insecure_no_auth=True, allow_file_extension_install=True)
    assert client.post("/api/v1/extensions/install", json={"url": local_repo}).status_code == 200


def test_file_install_needs_its_flag(tmp_path, local_repo):
    ext_dir = tmp_path / "exts"
    client = client_for(ext_app(tmp_path, dirs=(ext_dir,)))
    response = client.post("/api/v1/extensions/install", json={"url": local_repo})
    assert response.status_code == 403 and "--allow-file-extension-install" in response.json()["detail"]
    assert not (ext_dir / "hello-ext").exists()


def test_a_repository_that_is_not_an_extension_is_a_client_error(tmp_path):
    repo = tmp_path / "src" / "not-ext"
    git_extension_repo(repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "rm", "-q", "extension.toml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "not an extension"], check=True)
    ext_dir = tmp_path / "exts"
    client = client_for(ext_app(tmp_path, dirs=(ext_dir,)), allow_file_extension_install=True)
    response = client.post("/api/v1/extensions/install", json={"url": repo.as_uri()})
    assert response.status_code == 400, response.text
    assert "not an Atelier extension" in response.json()["detail"] and "extension.toml" in response.json()["detail"]
    missing = client.post("/api/v1/extensions/install", json={"url": (tmp_path / "nowhere").as_uri()})
    assert missing.status_code == 400 and "git clone failed" in missing.json()["detail"]
    assert not ext_dir.exists() or not any(ext_dir.iterdir())


def test_enable_disable_over_http_is_persisted(tmp_path):
    app = ext_app(tmp_path, dirs=(FIXTURES,), extensions_allow=("web-ext",))
    client = client_for(app)
    listed = {e["name"]: e for e in client.get("/api/v1/extensions").json()}
    assert listed["web-ext"]["status"] == "loaded" and listed["broken-import"]["status"] == "skipped"
    assert client.post("/api/v1/extensions/web-ext/enabled", json={"enabled": False}).json()["restart_required"]
    assert client.post("/api/v1/extensions/nope/enabled", json={"enabled": False}).status_code == 404
    assert statuses(ext_app(tmp_path, dirs=(FIXTURES,), extensions_allow=("web-ext",)))["web-ext"] == "disabled"


def test_changes_need_an_admin_when_auth_is_on(app):
    client = client_for(app, api_auth=(("alice", "pw"), ("root", "pw")), admin_users=("root",))
    denied = client.post("/api/v1/extensions/style-pack/enabled", json={"enabled": True}, auth=("alice", "pw"))
    assert denied.status_code == 403 and "admin" in denied.json()["detail"]
    assert client.get("/api/v1/extensions", auth=("alice", "pw")).status_code == 200
    assert client.get("/ext/web-ext/hello").status_code == 401  # extension routes sit behind auth too


def test_a1111_lists_show_extensions_and_styles(app):
    client = client_for(app)
    records = {r["name"]: r for r in client.get("/sdapi/v1/extensions").json()}
    assert records["web-ext"]["enabled"] is True and records["broken-import"]["enabled"] is False
    assert "Euler CFG++" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    styles = {s["name"]: s for s in client.get("/sdapi/v1/prompt-styles").json()}
    assert styles["Cinematic"]["prompt"].startswith("cinematic still of {prompt}")


def test_requirements_are_installed_only_on_request_and_never_beyond_localhost(tmp_path):
    from modules.plugins.extensions import ExtensionInfo
    from modules.plugins.host import PluginHost
    from modules.plugins.manager import build_plugin_manager
    from modules.server.extensions_api import extensions_router
    from tests.plugin_helpers import ext_settings

    (tmp_path / "requirements.txt").write_text("some-package==1.0\n")
    info = ExtensionInfo("needs-deps", path=tmp_path, requirements=tmp_path / "requirements.txt", status="loaded")
    host = PluginHost(build_plugin_manager(), [info])
    calls = []

    def runner(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="installed", stderr="")

    def client(server_host):
        from fastapi import FastAPI

        app = FastAPI()
        app.include_router(extensions_router(host, ext_settings(tmp_path), server_host, runner=runner))
        return TestClient(app, base_url="http://127.0.0.1")

    assert client("0.0.0.0").post("/extensions/needs-deps/requirements").status_code == 403
    assert calls == []
    response = client("127.0.0.1").post("/extensions/needs-deps/requirements")
    assert response.status_code == 200 and response.json()["output"] == "installed"
    assert calls[0][-3:] == ["install", "-r", str(tmp_path / "requirements.txt")]
