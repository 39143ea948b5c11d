"""Shared by the --devices and Ray tests: 4 users x 5 tiny jobs over HTTP, and the single-device reference."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

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


def run_jobs(server, checkpoints: tuple[str, ...] = ()) -> dict[tuple[str, int], tuple[dict, np.ndarray]]:
    """4 users x 5 jobs, submitted while the queue is paused, then run; (user, n) -> (job, pixels).
    `checkpoints`: used in turn (copies of one file, so the images stay the same); none: the default."""
    root = client(server, "root")
    root.post("/api/v1/queue/pause", json={"all": True})
    ids = {(user, n): submit(client(server, user), f"{user} job {n}", 1000 * int(user[4:]) + n,
                             checkpoints[n % len(checkpoints)] if checkpoints else None)
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


@pytest.fixture(scope="module", autouse=True, name="one_thread")
def one_thread_fixture():
    """Two CPU workers in one process would split torch's threads differently from one worker (a last-bit
    difference in a few pixels); with one thread each, bit-identical results can be asked for."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", name="reference")
def reference_fixture(tmp_path_factory, tiny_checkpoints):
    """The same 20 jobs on the default single-device executor."""
    srv = start_server(tmp_path_factory.mktemp("one-device"), {"tiny": tiny_checkpoints["sd1"]},
                       api_auth=USERS, admin_users=("root",))
    try:
        return run_jobs(srv)
    finally:
        srv.stop()


