"""The server log of a real `webui.py` process: no access lines unless --log-requests, and a failed
job is one line naming its id (issue 20). Styles come from DATA_DIR/styles.csv by default."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api_server import free_port, models_dir_with, wait_for

REPO = Path(__file__).resolve().parent.parent
JOB = {"prompt": "p" * 300, "width": 64, "height": 64, "steps": 1, "sampler_name": "Euler", "seed": 1,
       "styles": ["bomb"]}


def serve_and_log(tmp_path: Path, checkpoint: Path, *flags: str) -> tuple[str, str]:
    """Starts the server, sends 20 requests and one job that fails at run time; returns (job id, log)."""
    models_dir_with(tmp_path, {"tiny": checkpoint})
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "styles.csv").write_text(f"name,prompt,negative_prompt\nbomb,{'{prompt}' * 5000},\n")
    port, log_path = free_port(), tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "webui.py"), "--nowebui", "--port", str(port), "--device", "cpu",
             "--precision", "fp32", "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
             "--outputs-dir", str(tmp_path / "outputs"), *flags],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/api/v1/health", timeout=120)
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(20):
                assert http.get("/sdapi/v1/samplers").status_code == 200
            job = http.post("/api/v1/jobs", json={"kind": "txt2img", "params": JOB}).json()
            with http.stream("GET", f"/api/v1/jobs/{job['id']}/events") as events:
                for _ in events.iter_lines():
                    pass
            assert http.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "failed"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return job["id"], log_path.read_text()


@pytest.mark.slow
def test_log_has_no_access_lines_and_one_line_per_failed_job(tmp_path, tiny_checkpoints):
    job_id, log = serve_and_log(tmp_path, tiny_checkpoints["sd1"])
    assert "GET /sdapi/v1/samplers" not in log
    failed = [line for line in log.splitlines() if job_id in line]
    assert len(failed) == 1 and "styles make the prompt" in failed[0], log[-2000:]


@pytest.mark.slow
def test_log_requests_flag_logs_each_request(tmp_path, tiny_checkpoints):
    _, log = serve_and_log(tmp_path, tiny_checkpoints["sd1"], "--log-requests")
    assert log.count("GET /sdapi/v1/samplers") == 20
