"""--devices: one worker per device in one process (two CPU workers here), over real HTTP.

Fair and uncrossed under 4 users x 5 jobs, images bit-identical to the single-device executor,
model-affinity routing counted by the engines' own load log lines, and a worker joining later.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from modules.errors import AtelierError
from modules.server.executors import parse_devices, worker_names
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


def alternate(root, count: int, first: int = 0) -> list[dict]:
    """Jobs alternating between the two checkpoints, queued while paused and then run."""
    root.post("/api/v1/queue/pause", json={"all": True})
    ids = [submit(root, f"job {n}", n, "tiny-a" if n % 2 == 0 else "tiny-b") for n in range(first, first + count)]
    root.post("/api/v1/queue/resume", json={"all": True})
    return [wait_done(root, job_id) for job_id in ids]


def test_affinity_no_swaps_after_warm_up(tmp_path, tiny_checkpoints, caplog):
    caplog.set_level(logging.INFO, logger="modules.jobs.executor")
    models = {"tiny-a": tiny_checkpoints["sd1"], "tiny-b": tiny_checkpoints["sd1"]}
    # no start-up preload: whether it finishes before the first jobs would decide where they run
    srv = start_server(tmp_path, models, api_auth=USERS, admin_users=("root",), devices="cpu,cpu",
                       preload_model=False)
    try:
        root = client(srv, "root")
        warm = alternate(root, 2)
        warm_loads = sum(1 for r in caplog.records if r.getMessage().startswith("loading checkpoint"))
        caplog.clear()
        jobs = alternate(root, 12, first=2)
        workers = root.get("/api/v1/queue").json()["workers"]
    finally:
        srv.stop()
    assert warm_loads == 2 and warm[0]["worker"] != warm[1]["worker"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading checkpoint")] == []
    for n, job in enumerate(jobs):
        assert job["worker"] == warm[n % 2]["worker"] and job["result"]["model"] == ("tiny-a", "tiny-b")[n % 2]
    assert sorted(w["model"] for w in workers) == ["tiny-a", "tiny-b"]


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


def test_cluster_without_ray_names_the_extra(tmp_path):
    """Where Ray is not installed, --cluster stops with one line naming the extra (no traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys; sys.modules['ray'] = None; from modules.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["--cluster", "local", "--nowebui", "--port", "0", "--data-dir", str(tmp_path / "data"),
            "--models-dir", str(tmp_path / "models"), "--device", "cpu", "--precision", "fp32"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert "error: --cluster needs Ray: install the extra with  pip install .[cluster]" in done.stderr
    assert "Traceback" not in done.stderr


def test_input_images_travel_to_a_worker_as_bytes(tmp_path):
    """A remote worker gets img2img inputs as bytes and runs on its own copies (not the head's paths)."""
    from modules.server.cluster import _localised, input_paths

    head = tmp_path / "head"
    head.mkdir()
    (head / "init_images-0.png").write_bytes(b"png-0")
    (head / "mask-0.png").write_bytes(b"mask")
    inputs = {"init_images": [str(head / "init_images-0.png")], "mask": str(head / "mask-0.png")}
    spec = {"id": "a" * 32, "kind": "img2img", "params": {"inputs": inputs, "checkpoint": "tiny"}}
    files = {p: open(p, "rb").read() for p in input_paths(inputs)}
    local = _localised(spec, files, tmp_path / "worker" / spec["id"])
    moved = local["params"]["inputs"]
    assert open(moved["init_images"][0], "rb").read() == b"png-0" and open(moved["mask"], "rb").read() == b"mask"
    assert all(str(tmp_path / "worker") in p for p in input_paths(moved))
    assert local["params"]["checkpoint"] == "tiny" and spec["params"]["inputs"] == inputs  # the head's is untouched
