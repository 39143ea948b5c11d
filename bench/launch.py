"""Launch time: `./webui.sh` to a served page, and the bundled demo model's first image after launch.

    .venv/bin/python bench/launch.py [--runs 3] [--out bench/launch.json]
    python bench/launch.py --python /path/to/venv/bin/python [--env OMP_WAIT_POLICY=PASSIVE]

Each run starts `./webui.sh --api` on a free port as a user would (the venv already set up, so
tools/setup_venv.sh finds its stamp and skips pip), then times: the page (GET / answers 200),
and one txt2img of the demo model at its native 128x128 with the UI's defaults, sent as
soon as the page is up (so it includes the model load). Prints a table and writes JSON.
`--python` starts `PYTHON webui.py` directly instead (webui.sh's environment, no setup step: for a
shared or read-only venv); `--env KEY=VALUE` adds to the server's environment (A/B runs).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))


def wait_for_page(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"webui.sh exited with {proc.returncode}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def launch_command(python: str | None) -> list[str]:
    return [python, str(REPO / "webui.py")] if python else [str(REPO / "webui.sh")]


def one_launch(port: int, data_dir: Path, python: str | None = None, env: dict[str, str] | None = None) -> dict:
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen([*launch_command(python), "--api", "--port", str(port), "--data-dir", str(data_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_page(url, proc)
        page = time.monotonic() - start
        job = {"prompt": "a red circle on a blue background", "width": 128, "height": 128, "seed": 1,
               "steps": 20, "sampler_name": "DPM++ 2M"}  # the web UI's defaults (the API's are 50 Euler)
        response = httpx.post(url + "/sdapi/v1/txt2img", json=job, timeout=300)
        response.raise_for_status()
        first_image = time.monotonic() - start
        steps = json.loads(response.json()["info"])["steps"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return {"page_s": round(page, 2), "first_image_s": round(first_image, 2),
            "image_after_page_s": round(first_image - page, 2), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    from cpu import print_markdown_table

    from tests.api_server import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "launch.json")
    ap.add_argument("--python", help="start PYTHON webui.py instead of webui.sh (no setup step)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="added to the server's environment")
    args = ap.parse_args(argv)
    if not args.python:
        subprocess.run([str(REPO / "tools" / "setup_venv.sh")], check=True)  # the first launch's install, untimed
    data_dir = REPO / "bench" / "cache" / "launch-data"
    env = dict(item.split("=", 1) for item in args.env)
    runs = [one_launch(free_port(), data_dir, args.python, env) for _ in range(args.runs)]
    print_markdown_table({f"launch {n + 1}": r for n, r in enumerate(runs)},
                         {"page s": "page_s", "first image s": "first_image_s",
                          "image after page s": "image_after_page_s", "steps": "steps"})
    summary = {"runs": runs, "best_page_s": min(r["page_s"] for r in runs),
               "best_first_image_s": min(r["first_image_s"] for r in runs), "cpus": os.cpu_count(),
               "python": args.python, "env": env}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best: page {summary['best_page_s']} s, first image {summary['best_first_image_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
