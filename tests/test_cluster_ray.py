"""--cluster local: a Ray instance on loopback with two CPU actors, over real HTTP.

Affinity counted by the workers' own loads, 4 users x 5 jobs bit-identical to the local
executor, a worker with other extensions refused, a worker killed by PID mid-job (retried
elsewhere exactly once, then a second loss ends the job), and a worker joining later.
Skipped, with the reason, where Ray (the `cluster` extra) is not installed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import numpy as np
import pytest

from tests.api_server import start_server
from tests.cluster_helpers import (  # noqa: F401  (fixtures)
    USERS,
    check_uncrossed,
    client,
    one_thread_fixture,
    reference_fixture,
    run_jobs,
    submit,
    wait_done,
)

pytest.importorskip("ray", reason="Ray is not installed (pip install .[cluster]): the Ray executor tests skip")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoints):
    os.environ["ATELIER_RAY_CPUS"] = "4"  # logical CPUs: two workers plus room for one joining or refused
    models = {"tiny-a": tiny_checkpoints["sd1"], "tiny-b": tiny_checkpoints["sd1"]}
    srv = start_server(tmp_path_factory.mktemp("ray"), models, api_auth=USERS, admin_users=("root",),
                       devices="cpu,cpu", cluster="local", preload_model=False)
    # no start-up preload: a worker still loading when the first jobs arrive would send both to the other
    yield srv
    srv.stop()
    os.environ.pop("ATELIER_RAY_CPUS", None)


def loads(srv) -> dict[str, int]:
    """Checkpoint loads as each worker process counts them."""
    return {name: info["loads"] for name, info in srv.context.executor.worker_info().items()}


def alternate(root, count: int, first: int = 0) -> list[dict]:
    """Jobs alternating between the two checkpoints, queued while paused and then run."""
    root.post("/api/v1/queue/pause", json={"all": True})
    ids = [submit(root, f"job {n}", n, "tiny-a" if n % 2 == 0 else "tiny-b") for n in range(first, first + count)]
    root.post("/api/v1/queue/resume", json={"all": True})
    return [wait_done(root, job_id) for job_id in ids]


def test_affinity_no_swaps_after_warm_up(cluster):
    root = client(cluster, "root")
    warm = alternate(root, 2)
    before = loads(cluster)
    assert sum(before.values()) == 2 and warm[0]["worker"] != warm[1]["worker"]
    jobs = alternate(root, 12, first=2)
    assert loads(cluster) == before  # no swap after the warm-up
    for n, job in enumerate(jobs):
        assert job["worker"] == warm[n % 2]["worker"] and job["result"]["model"] == ("tiny-a", "tiny-b")[n % 2]


def test_four_users_uncrossed_and_bit_identical_to_local(cluster, reference):
    results = run_jobs(cluster, ("tiny-a", "tiny-b"))  # the same weights under two names: both workers work
    assert len(results) == 20
    check_uncrossed(results)
    assert {job["worker"] for job, _ in results.values()} == {"ray-cpu", "ray-cpu#2"}
    for key, (_, image) in results.items():
        np.testing.assert_array_equal(image, reference[key][1], err_msg=str(key))


def test_a_worker_with_other_extensions_is_refused(cluster, caplog):
    caplog.set_level(logging.ERROR, logger="modules.server.cluster")
    executor = cluster.context.executor
    settings = dataclasses.replace(executor.app.settings, disable_all_extensions=True)
    assert executor.start_worker(False, settings, name="odd") is None
    assert any("worker odd refused: its extensions (none) differ" in r.getMessage() for r in caplog.records)
    assert "odd" not in executor.worker_info()


def test_queue_survives_a_restart_on_ray(tmp_path, tiny_checkpoints, cluster):
    """Queued, steered jobs outlive the server; after the restart Ray workers run them in that order."""
    def start():
        return start_server(tmp_path, {"tiny": tiny_checkpoints["sd1"]}, api_auth=USERS, admin_users=("root",),
                            devices="cpu", cluster="local")  # joins the running Ray instance: one actor

    srv = start()
    try:
        root, user = client(srv, "root"), client(srv, "user2")
        root.post("/api/v1/queue/pause", json={"all": True})
        ids = [submit(user, "kept", 50 + n) for n in range(3)]
        user.post(f"/api/v1/queue/{ids[2]}/move", json={"index": 0})
    finally:
        srv.stop()
    srv = start()
    try:
        root, user = client(srv, "root"), client(srv, "user2")
        assert root.get("/api/v1/queue").json()["paused"] is True
        root.post("/api/v1/queue/resume", json={"all": True})
        jobs = {job_id: wait_done(user, job_id) for job_id in ids}
        assert sorted(ids, key=lambda i: jobs[i]["started"]) == [ids[2], ids[0], ids[1]]
        assert {job["worker"] for job in jobs.values()} == {"ray-cpu"}
    finally:
        srv.stop()


def wait_step(c, job_id: str, worker: str | None = None) -> dict:
    """The job once it runs (on `worker`, if given) and has taken a sampling step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["worker"] and job["worker"] == (worker or job["worker"]) \
                and job["progress"]["step"] >= 1:
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def kill(srv, worker: str) -> None:
    os.kill(srv.context.executor.worker_info()[worker]["pid"], signal.SIGKILL)


def test_killed_worker_job_completes_elsewhere_once_then_two_losses_fail_then_a_new_worker(cluster):
    user = client(cluster, "user1")
    executor = cluster.context.executor
    job_id = submit(user, "long", 42, steps=1000)
    first = wait_step(user, job_id)["worker"]
    kill(cluster, first)
    job = wait_done(user, job_id)
    assert job["worker"] != first and job["result"]["seeds"] == [42] and len(job["result"]["images"]) == 1
    assert any("retrying on another worker" in w for w in job["result"]["warnings"])
    listed = [j["id"] for j in user.get("/api/v1/jobs", params={"limit": 500}).json()["jobs"]]
    assert listed.count(job_id) == 1
    assert executor.slots == 1

    assert executor.start_worker(False, name="late") is not None  # joins; the next job may run there
    second = submit(user, "long", 43, steps=1000)
    on = wait_step(user, second)["worker"]
    kill(cluster, on)
    other = ({"ray-cpu", "ray-cpu#2", "late"} - {first, on}).pop()
    wait_step(user, second, other)
    kill(cluster, other)
    deadline = time.monotonic() + 120
    while (failed := user.get(f"/api/v1/jobs/{second}").json())["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert failed["state"] == "failed" and "died while running it" in failed["error"]
    assert executor.slots == 0

    third = submit(user, "after", 44)
    time.sleep(0.5)
    assert user.get(f"/api/v1/jobs/{third}").json()["state"] == "queued"  # no worker: it waits
    assert executor.start_worker(False, name="later") is not None
    assert wait_done(user, third)["worker"] == "later"
