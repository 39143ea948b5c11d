"""Steering the queue over real HTTP: pause/resume, reorder, admin priority, cancel, rights, restart."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.api_server import start_server

USERS = (("alice", "a-pass"), ("bob", "b-pass"), ("root", "r-pass"))
JOB = {"kind": "txt2img", "params": {"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                     "sampler_name": "Euler", "seed": 5}}


def client(server, user: str) -> httpx.Client:
    password = dict(USERS)[user]
    return httpx.Client(base_url=server.url, auth=(user, password), timeout=120)


def submit(c: httpx.Client, seed: int = 5) -> str:
    body = {**JOB, "params": {**JOB["params"], "seed": seed}}
    r = c.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_state(c: httpx.Client, job_id: str, states: tuple[str, ...] = ("done",), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


def queue_ids(c: httpx.Client) -> list[str]:
    """The caller's queued jobs in run order."""
    jobs = [j for j in c.get("/api/v1/queue").json()["jobs"] if j["state"] == "queued"]
    return [j["id"] for j in sorted(jobs, key=lambda j: j["position"])]


def started_order(c_by_id: dict[str, httpx.Client], ids: list[str]) -> list[str]:
    jobs = {i: wait_state(c_by_id[i], i) for i in ids}
    return sorted(ids, key=lambda i: jobs[i]["started"])


@pytest.fixture()
def server(tmp_path, tiny_checkpoints):
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",))
    yield srv
    srv.stop()


def test_pause_reorder_priority_cancel_and_rights(server):
    alice, bob, root = client(server, "alice"), client(server, "bob"), client(server, "root")
    assert alice.post("/api/v1/queue/pause", json={"all": True}).status_code == 403
    assert alice.post("/api/v1/queue/pause", json={"owner": "bob"}).status_code == 403
    assert root.post("/api/v1/queue/pause", json={"all": True}).json()["paused"] is True

    a1, a2, a3 = (submit(alice, s) for s in (1, 2, 3))
    b1, b2 = (submit(bob, s) for s in (4, 5))
    view = alice.get("/api/v1/queue").json()
    assert {j["id"] for j in view["jobs"]} == {a1, a2, a3}  # only her own jobs
    assert {j["owner"] for j in root.get("/api/v1/queue").json()["jobs"]} == {"alice", "bob"}
    assert [j["position"] for j in sorted(view["jobs"], key=lambda j: j["position"])] == [0, 2, 4]  # fair
    assert all(j["paused"] for j in view["jobs"]) and view["workers"]

    assert alice.post(f"/api/v1/queue/{a3}/move", json={"index": 0}).json()["order"] == [a3, a1, a2]
    assert queue_ids(alice) == [a3, a1, a2]
    assert alice.post(f"/api/v1/queue/{b1}/move", json={"index": 0}).status_code == 404  # not hers
    assert alice.post(f"/api/v1/queue/{a1}/move", json={"index": -1}).status_code == 422
    assert alice.post(f"/api/v1/queue/{a1}/priority", json={"priority": 5}).status_code == 403
    assert root.post(f"/api/v1/queue/{b2}/priority", json={"priority": 10}).json()["position"] == 0
    assert queue_ids(root)[0] == b2
    assert alice.delete(f"/api/v1/queue/{a2}").json()["state"] == "cancelled"
    assert bob.delete(f"/api/v1/queue/{a1}").status_code == 404
    assert alice.get(f"/api/v1/jobs/{a2}").json()["state"] == "cancelled"

    assert bob.post("/api/v1/queue/pause", json={}).json()["paused_owners"] == ["bob"]  # his own jobs
    assert root.post("/api/v1/queue/resume", json={"all": True}).json()["paused"] is False
    assert started_order({a1: alice, a3: alice}, [a1, a3]) == [a3, a1]  # the order alice chose
    assert wait_state(alice, a1)["worker"] == "local"
    time.sleep(0.5)  # bob's lane is paused: his jobs must still wait
    assert {bob.get(f"/api/v1/jobs/{i}").json()["state"] for i in (b1, b2)} == {"queued"}
    queued = bob.get("/api/v1/queue").json()["jobs"]
    assert all(j["eta"] is not None and j["eta"] > 0 for j in queued)  # two jobs ran: ETAs are known
    assert bob.get(f"/api/v1/jobs/{b1}").json()["eta"] > 0  # the job view carries it too
    assert bob.post("/api/v1/queue/resume", json={}).status_code == 200
    assert started_order({b1: bob, b2: bob}, [b1, b2]) == [b2, b1]  # priority first
    assert bob.post(f"/api/v1/queue/{b1}/move", json={"index": 0}).status_code == 409  # finished


def test_queue_order_priority_and_pause_survive_a_restart(tmp_path, tiny_checkpoints):
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",))
    try:
        alice, root = client(srv, "alice"), client(srv, "root")
        root.post("/api/v1/queue/pause", json={"all": True})
        a1, a2, a3 = (submit(alice, s) for s in (1, 2, 3))
        r1 = submit(root, 9)
        alice.post(f"/api/v1/queue/{a3}/move", json={"index": 0})
        root.post(f"/api/v1/queue/{a2}/priority", json={"priority": 3})
        root.post("/api/v1/queue/pause", json={"owner": "root"})
        before = queue_ids(root)
    finally:
        srv.stop()
    assert before == [a2, a3, a1, r1]
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",))
    try:
        alice, root = client(srv, "alice"), client(srv, "root")
        view = root.get("/api/v1/queue").json()
        assert view["paused"] is True and view["paused_owners"] == ["root"]
        assert queue_ids(root) == before
        assert [j["priority"] for j in sorted(view["jobs"], key=lambda j: j["position"])] == [3, 0, 0, 0]
        root.post("/api/v1/queue/resume", json={"all": True})
        assert started_order({i: alice for i in (a1, a2, a3)}, [a1, a2, a3]) == [a2, a3, a1]
        assert root.get(f"/api/v1/jobs/{r1}").json()["state"] == "queued"  # root's own pause holds
        root.post("/api/v1/queue/resume", json={})
        assert wait_state(root, r1)["state"] == "done"
    finally:
        srv.stop()


def test_queue_panel_in_the_browser(server):
    """The panel steers through the same routes: reorder, cancel, pause (a user), priority (an admin)."""
    from tests.ui_helpers import launch_browser, require_browser, screenshot_dir

    playwright_api = require_browser()
    alice, root = client(server, "alice"), client(server, "root")
    root.post("/api/v1/queue/pause", json={"all": True})
    a1, a2, a3 = (submit(alice, s) for s in (1, 2, 3))
    b1 = submit(client(server, "bob"), 4)
    with playwright_api.sync_playwright() as playwright:
        browser = launch_browser(playwright)
        try:
            context = browser.new_context(http_credentials={"username": "alice", "password": "a-pass"})
            page = context.new_page()
            page.goto(server.url + "/api/v1/queue/panel")
            row = page.locator(f"tr[data-id='{a3}']")
            row.wait_for(timeout=30_000)
            assert page.locator("tbody tr").count() == 3  # only her own jobs
            row.locator("button[title=earlier]").click()
            page.wait_for_function(f"document.querySelector('tbody tr').dataset.id === '{a1}' && "
                                   f"document.querySelectorAll('tbody tr')[1].dataset.id === '{a3}'")
            assert queue_ids(alice) == [a1, a3, a2]
            page.locator(f"tr[data-id='{a2}'] button[title='cancel this job']").click()
            page.locator(f"tr[data-id='{a2}']").wait_for(state="detached", timeout=30_000)
            assert alice.get(f"/api/v1/jobs/{a2}").json()["state"] == "cancelled"
            page.locator(f"tr[data-id='{a1}'] button[title='admins only']").click()
            page.wait_for_function("document.getElementById('status').textContent.includes('Only admins')")
            page.click("#pause-mine")
            page.wait_for_function("document.getElementById('workers').textContent.includes('paused: alice')")
            assert root.get("/api/v1/queue").json()["paused_owners"] == ["alice"]
            page.screenshot(path=str(screenshot_dir() / "queue-panel.png"))

            admin = browser.new_context(http_credentials={"username": "root", "password": "r-pass"}).new_page()
            admin.goto(server.url + "/api/v1/queue/panel")
            admin.locator(f"tr[data-id='{b1}']").wait_for(timeout=30_000)
            admin.locator(f"tr[data-id='{b1}'] input.priority").fill("7")
            admin.locator(f"tr[data-id='{b1}'] button[title='admins only']").click()
            admin.wait_for_function(f"document.querySelector('tbody tr').dataset.id === '{b1}'")
            assert queue_ids(root)[0] == b1
        finally:
            browser.close()
