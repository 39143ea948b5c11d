"""The jobs API and auth over real HTTP: owners, SSE events, cancel, images, extension routes, --listen."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi import APIRouter

from modules.server.app import mount_extension_routes
from modules.server.auth import check_basic
from modules.server.config import ServerConfig, StartupRefused, parse_api_auth
from tests.api_server import start_server

USERS = (("alice", "a-pass"), ("bob", "b-pass"), ("root", "r:pass"))
JOB = {"kind": "txt2img", "params": {"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                     "sampler_name": "Euler", "seed": 5}}
LONG = {"kind": "txt2img", "params": {**JOB["params"], "steps": 400}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("jobs-api"), {"tiny": tiny_checkpoints["sd1"]},
                       api_auth=USERS, admin_users=("root",))
    router = APIRouter()

    @router.get("/hello")
    def hello() -> dict:
        return {"hello": "world"}

    assert mount_extension_routes(srv.server.config.app, [("demo-ext", router)]) == ["/ext/demo-ext"]
    yield srv
    srv.stop()


def client(server, user: str | None) -> httpx.Client:
    auth = next(((u, p) for u, p in USERS if u == user), None)
    return httpx.Client(base_url=server.url, auth=auth, timeout=120)


def wait_state(c: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


def wait_running_step(c: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while c.get(f"/api/v1/jobs/{job_id}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("path", ["/sdapi/v1/options", "/api/v1/jobs", "/docs", "/openapi.json",
                                  "/ext/demo-ext/hello", "/api/v1/health", "/no/such/route"])
def test_every_route_needs_auth(server, path):
    assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + path, auth=("alice", "wrong")).status_code == 401
    assert httpx.get(server.url + path, auth=("mallory", "a-pass")).status_code == 401
    assert httpx.get(server.url + path, auth=("alice", "a-pass")).status_code in (200, 404)


def test_extension_route_served_with_auth(server):
    assert client(server, "alice").get("/ext/demo-ext/hello").json() == {"hello": "world"}
    with pytest.raises(ValueError):
        mount_extension_routes(server.server.config.app, [("../evil", APIRouter())])


def test_basic_auth_parsing():
    creds = [(u.encode(), p.encode()) for u, p in USERS]
    import base64

    header = b"Basic " + base64.b64encode(b"root:r:pass")
    assert check_basic(header, creds) == "root"
    assert check_basic(b"Basic !!!", creds) is None and check_basic(b"Bearer x", creds) is None
    assert parse_api_auth("a:b, c:d:e") == (("a", "b"), ("c", "d:e"))


def test_listen_refuses_to_start_without_auth():
    with pytest.raises(StartupRefused):
        ServerConfig(listen=True).check_startup()
    ServerConfig(listen=True, insecure_no_auth=True).check_startup()
    ServerConfig(listen=True, api_auth=(("a", "b"),)).check_startup()
    assert ServerConfig().host == "127.0.0.1" and ServerConfig(listen=True).host == "0.0.0.0"
    from modules.cli import main

    assert main(["--listen", "--nowebui"]) == 2


def test_submit_follow_events_and_fetch_images(server):
    c = client(server, "alice")
    created = c.post("/api/v1/jobs", json=JOB)
    assert created.status_code == 201 and set(created.json()) == {"id", "position", "state"}
    job_id = created.json()["id"]
    events = []
    with c.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and kinds[-1] == "done"
    final = events[-1][1]
    assert final["result"]["seeds"] == [5] and final["result"]["info"]["all_seeds"] == [5]
    if "progress" in kinds:
        progress = [d for k, d in events if k == "progress"]
        assert progress[-1]["steps"] == 2 and progress[-1]["preview"].startswith("data:image/png;base64,")
    image = c.get(final["result"]["images"][0])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/api/v1/jobs/{job_id}/images/7").status_code == 404
    listed = c.get("/api/v1/jobs", params={"owner": "me"}).json()["jobs"]
    assert job_id in [j["id"] for j in listed] and all(j["owner"] == "alice" for j in listed)
    assert all(url.startswith("/api/v1/jobs/") for url in final["result"]["images"])  # no server paths
    assert str(server.context.data_dir) not in json.dumps(final)


def test_owners_are_isolated_and_admin_is_not(server):
    alice, bob, root = client(server, "alice"), client(server, "bob"), client(server, "root")
    long_id = alice.post("/api/v1/jobs", json=LONG).json()["id"]
    queued_id = alice.post("/api/v1/jobs", json=JOB).json()["id"]
    wait_running_step(alice, long_id)
    for response in (bob.get(f"/api/v1/jobs/{long_id}"), bob.delete(f"/api/v1/jobs/{long_id}"),
                     bob.get(f"/api/v1/jobs/{long_id}/images/0"), bob.get(f"/api/v1/jobs/{long_id}/events")):
        assert response.status_code == 404
    assert bob.post("/sdapi/v1/interrupt").status_code == 200  # bob has nothing running: no effect
    assert bob.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert long_id not in [j["id"] for j in bob.get("/api/v1/jobs", params={"owner": "alice"}).json()["jobs"]]
    time.sleep(0.3)
    assert alice.get(f"/api/v1/jobs/{long_id}").json()["state"] == "running"
    mine = alice.get("/sdapi/v1/progress").json()
    assert mine["state"]["job"] == long_id and mine["state"]["queued_jobs"] == 2
    assert alice.delete(f"/api/v1/jobs/{queued_id}").json()["state"] == "cancelled"
    assert root.get(f"/api/v1/jobs/{long_id}").status_code == 200
    assert root.post("/sdapi/v1/interrupt").status_code == 200  # the admin may stop anyone's job
    done = wait_state(alice, long_id, ("done",))
    assert done["result"]["interrupted"] is True and len(done["result"]["images"]) == 1
    assert {j["owner"] for j in root.get("/api/v1/jobs", params={"owner": "all"}).json()["jobs"]} >= {"alice"}


def test_cancel_running_job_keeps_images(server):
    c = client(server, "bob")
    job_id = c.post("/api/v1/jobs", json=LONG).json()["id"]
    wait_running_step(c, job_id)
    c.delete(f"/api/v1/jobs/{job_id}")
    job = wait_state(c, job_id, ("cancelled",))
    assert len(job["result"]["images"]) == 1


def test_jobs_api_validation(server):
    c = client(server, "alice")
    bad = c.post("/api/v1/jobs", json={"kind": "txt2img", "params": {"steps": -3}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "steps"]
    wrong_type = c.post("/api/v1/jobs", json={"kind": "txt2img", "params": {"width": "wide"}})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["loc"] == ["body", "params", "width"]
    assert c.post("/api/v1/jobs", json={"kind": "video"}).status_code == 422
    assert c.post("/api/v1/jobs", json={"kind": "inpaint", "params": {"init_images": []}}).status_code == 422
    assert c.get("/api/v1/jobs/../../etc/passwd").status_code == 404
    assert c.get("/api/v1/jobs/not-an-id/images/0").status_code == 404
    huge = c.post("/api/v1/jobs", content=b"x" * (101 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
