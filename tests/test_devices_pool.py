"""--devices: one worker per device in one process (two CPU workers here), over real HTTP.

Fair and uncrossed under 4 users x 5 jobs, images bit-identical to the single-device executor,
model-affinity routing counted by the engines' own load log lines, and a worker joining later.
"""
from __future__ import annotations

import io
import logging
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from modules.errors import AtelierError
from modules.server.executors import parse_devices, worker_names
from tests.api_server import start_server

USERS = tuple((f"user{n}", f"pass{n}") for n in range(4)) + (("root", "r-pass"),)
BASE = {"width": 64, "height": 64, "steps": 1, "sampler_name": "Euler"}


def client(server, user: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=(user, dict(USERS)[user]), timeout=120)


def submit(c: httpx.Client, prompt: str, seed: int, checkpoint: str | None = None, steps: int = 1) -> str:
    params = {**BASE, "prompt": prompt, "seed": seed, "steps": steps}
    if checkpoint:
        params["override_settings"] = {"sd_model_checkpoint": checkpoint}
    r = c.post("/api/v1/jobs", json={"kind": "txt2img", "params": params})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_done(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def pixels(c: httpx.Client, job: dict) -> np.ndarray:
    r = c.get(job["result"]["images"][0])
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def run_jobs(server) -> dict[tuple[str, int], tuple[dict, np.ndarray]]:
    """4 users x 5 jobs, submitted while the queue is paused, then run; (user, n) -> (job, pixels)."""
    root = client(server, "root")
    root.post("/api/v1/queue/pause", json={"all": True})
    ids = {(user, n): submit(client(server, user), f"{user} job {n}", 1000 * int(user[4:]) + n)
           for user, _ in USERS[:4] for n in range(5)}
    root.post("/api/v1/queue/resume", json={"all": True})
    out = {}
    for (user, n), job_id in ids.items():
        c = client(server, user)
        job = wait_done(c, job_id)
        out[(user, n)] = (job, pixels(c, job))
    return out


def check_uncrossed(results) -> None:
    for (user, n), (job, _) in results.items():
        assert job["owner"] == user
        assert job["result"]["seeds"] == [1000 * int(user[4:]) + n]
        assert job["result"]["prompts"] == [f"{user} job {n}"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two CPU workers in one process would split torch's threads differently from one worker (a last-bit
    difference in a few pixels); with one thread each, bit-identical results can be asked for."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoints):
    """The same 20 jobs on the default single-device executor."""
    srv = start_server(tmp_path_factory.mktemp("one-device"), {"tiny": tiny_checkpoints["sd1"]},
                       api_auth=USERS, admin_users=("root",))
    try:
        return run_jobs(srv)
    finally:
        srv.stop()


def test_parse_devices():
    assert parse_devices(None) == ()
    assert parse_devices("all", cuda_count=0) == ("cpu",)  # the CPU counts as one device
    assert parse_devices("all", cuda_count=2) == ("cuda:0", "cuda:1")
    assert parse_devices("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    assert worker_names(("cpu", "cpu", "cuda:0")) == ["cpu", "cpu#2", "cuda:0"]
    with pytest.raises(AtelierError, match="--devices: 'gpu0' is not a device"):
        parse_devices("gpu0")


def test_two_cpu_workers_fair_uncrossed_and_bit_identical(tmp_path, tiny_checkpoints, reference):
    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",),
                       devices="cpu,cpu")
    try:
        results = run_jobs(srv)
        workers = client(srv, "root").get("/api/v1/queue").json()["workers"]
    finally:
        srv.stop()
    assert len(results) == 20
    check_uncrossed(results)
    assert {job["worker"] for job, _ in results.values()} == {"cpu", "cpu#2"}
    assert sorted(w["name"] for w in workers) == ["cpu", "cpu#2"]
    for key, (_, image) in results.items():
        np.testing.assert_array_equal(image, reference[key][1], err_msg=str(key))


def test_affinity_no_swaps_after_warm_up(tmp_path, tiny_checkpoints, caplog):
    caplog.set_level(logging.INFO, logger="modules.jobs.executor")
    models = {"tiny-a": tiny_checkpoints["sd1"], "tiny-b": tiny_checkpoints["sd1"]}
    srv = start_server(tmp_path, models, api_auth=USERS, admin_users=("root",), devices="cpu,cpu")
    try:
        root = client(srv, "root")
        root.post("/api/v1/queue/pause", json={"all": True})
        ids = [submit(root, f"job {n}", n, "tiny-a" if n % 2 == 0 else "tiny-b") for n in range(10)]
        root.post("/api/v1/queue/resume", json={"all": True})
        jobs = [wait_done(root, job_id) for job_id in ids]
        workers = root.get("/api/v1/queue").json()["workers"]
    finally:
        srv.stop()
    loads = [(r.threadName, r.getMessage()) for r in caplog.records if r.getMessage().startswith("loading checkpoint")]
    assert sorted(m for _, m in loads) == ["loading checkpoint tiny-a", "loading checkpoint tiny-b"]  # warm-up only
    assert len({t for t, _ in loads}) == 2  # one load on each worker
    by_model = {}
    for n, job in enumerate(jobs):
        by_model.setdefault("tiny-a" if n % 2 == 0 else "tiny-b", set()).add(job["worker"])
    assert all(len(names) == 1 for names in by_model.values()) and by_model["tiny-a"] != by_model["tiny-b"]
    assert sorted(w["loads"] for w in workers) == [1, 1]


def test_a_worker_joining_later_picks_up_work(tmp_path, tiny_checkpoints):
    from modules.app import build_engine
    from modules.jobs.executor import LocalExecutor

    srv = start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",),
                       devices="cpu,cpu")
    try:
        root = client(srv, "root")
        long_ids = [submit(root, "long", n, steps=500) for n in range(2)]
        _wait_running(srv, long_ids)
        short = submit(client(srv, "user0"), "short", 7)
        time.sleep(0.5)
        assert client(srv, "user0").get(f"/api/v1/jobs/{short}").json()["state"] == "queued"  # both busy
        ctx = srv.context
        ctx.executor.add_worker("late", LocalExecutor(build_engine(ctx.app, "cpu"), ctx.data_dir / "job-images",
                                                      name="late"))
        job = wait_done(client(srv, "user0"), short)
        assert job["worker"] == "late"
        assert {root.get(f"/api/v1/jobs/{i}").json()["state"] for i in long_ids} == {"running"}
        for job_id in long_ids:
            root.delete(f"/api/v1/jobs/{job_id}")
    finally:
        srv.stop()


def _wait_running(srv, long_ids) -> None:
    """Wait until both long jobs run (one per worker)."""
    root = client(srv, "root")
    deadline = time.monotonic() + 120
    while {root.get(f"/api/v1/jobs/{i}").json()["state"] for i in long_ids} != {"running"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
