"""tools/setup_venv.sh skips pip when the venv is current (a stamp of pyproject.toml, the script and the torch
pin) and says what it does (issue 20). The real script runs in a copy of the repository's layout, with a
stand-in .venv/bin/python that records its calls instead of installing anything."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../calls.log"
case "$*" in *"print('torch=="*) echo "torch==2.13.0" ;; esac
exit 0
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "setup_venv.sh", tmp_path / "tools")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(checkout: Path, **env: str) -> tuple[str, list[str]]:
    """Runs the script; returns (what it printed, the pip calls it made)."""
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run([str(checkout / "tools" / "setup_venv.sh")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return done.stderr, [c for c in calls if c.startswith("-m pip")]


def test_second_run_skips_pip_until_pyproject_changes(checkout):
    said, pip = setup(checkout)
    assert "[setup] installing Atelier (.)" in said and "[setup] done" in said, said
    assert any("install" in c and "-e ." in c for c in pip), pip

    said, pip = setup(checkout)
    assert pip == [] and "skipping pip" in said and ".venv is up to date" in said, said

    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# a dependency changed\n")
    said, pip = setup(checkout)
    assert pip and "installing Atelier" in said

    said, pip = setup(checkout, ATELIER_REINSTALL="1")  # forced
    assert pip and "installing Atelier" in said
