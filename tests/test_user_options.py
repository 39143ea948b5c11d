"""Under auth, server options and model management are admin-only; per-job options are per-user
defaults (issue 23, item 4). Real HTTP against the real server."""
from __future__ import annotations

import json

import httpx
import pytest

from modules.server.user_options import UserOptions, user_folder_name

USERS = (("alice", "a-pass"), ("bob", "b-pass"), ("root", "r-pass"))
AUTH = {u: (u, p) for u, p in USERS}
SMALL = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "sampler_name": "Euler", "seed": 3}
ADMIN_ROUTES = ("/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint", "/sdapi/v1/refresh-checkpoints",
                "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    from tests.api_server import start_server

    srv = start_server(tmp_path_factory.mktemp("user-options"), {"tiny": tiny_checkpoints["sd1"]},
                       api_auth=USERS, admin_users=("root",))
    yield srv
    srv.stop()


def client(server, user: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=AUTH[user], timeout=120)


def test_bob_sets_only_his_own_defaults(server):
    bob, alice = client(server, "bob"), client(server, "alice")
    before = alice.get("/sdapi/v1/options").json()
    assert bob.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2,
                                               "eta_noise_seed_delta": 31337}).status_code == 200
    assert bob.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 31337  # his merged view
    after = alice.get("/sdapi/v1/options").json()
    assert after == before and after["CLIP_stop_at_last_layers"] == 1 and after["eta_noise_seed_delta"] == 0
    saved = server.context.data_dir / "users" / "bob" / "config.json"
    assert json.loads(saved.read_text()) == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
    assert server.context.options.get("eta_noise_seed_delta") == 0  # the server's options did not move


def test_per_user_defaults_reach_that_users_jobs_only(server):
    bob, alice = client(server, "bob"), client(server, "alice")
    assert bob.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    bob_info = json.loads(bob.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
    alice_info = json.loads(alice.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
    assert bob_info["clip_skip"] == 2 and "Clip skip: 2" in bob_info["infotexts"][0]
    assert alice_info["clip_skip"] == 1 and "Clip skip" not in alice_info["infotexts"][0]


def test_non_admins_cannot_change_server_state(server):
    bob = client(server, "bob")
    for changes in ({"sd_model_checkpoint": "tiny"}, {"show_progress_every_n_steps": 5},
                    {"CLIP_stop_at_last_layers": 2, "live_previews_enable": False}):
        refused = bob.post("/sdapi/v1/options", json=changes)
        assert refused.status_code == 403, changes
        assert "admin" in refused.json()["detail"] and "CLIP_stop_at_last_layers" in refused.json()["detail"]
    assert server.context.options.get("show_progress_every_n_steps") != 5
    for path in ADMIN_ROUTES:
        refused = bob.post(path)
        assert refused.status_code == 403 and "--admin-users" in refused.json()["detail"], path
    echoed = bob.get("/sdapi/v1/options").json()  # a GET posted back unchanged is no change
    assert bob.post("/sdapi/v1/options", json=echoed).status_code == 200
    bad = bob.post("/sdapi/v1/options", json={"randn_source": "quantum"})
    assert bad.status_code == 422 and "randn_source" in bad.text


def test_admins_change_server_options_and_models(server):
    root = client(server, "root")
    assert root.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 3}).status_code == 200
    assert server.context.options.get("show_progress_every_n_steps") == 3
    assert client(server, "alice").get("/sdapi/v1/options").json()["show_progress_every_n_steps"] == 3
    for path in ADMIN_ROUTES:
        assert root.post(path).status_code == 200, path


def test_user_folder_names_are_sanitised(tmp_path):
    assert user_folder_name("bob") == "bob"
    for hostile in ("../../etc", "a/b", "..", "C:\\x", "", "x" * 200, "bob\x00"):
        name = user_folder_name(hostile)
        assert "/" not in name and "\\" not in name and ".." not in name and name.startswith("user-")
    assert user_folder_name("../a") != user_folder_name("../b")
    store = UserOptions(tmp_path / "users")
    store.update("../../escape", {"emphasis": "None"})
    assert [p.parent.parent for p in tmp_path.rglob("config.json")] == [tmp_path / "users"]
    assert store.get("../../escape") == {"emphasis": "None"} and store.get("other") == {}
    with pytest.raises(KeyError):
        store.update("bob", {"sd_model_checkpoint": "x"})
