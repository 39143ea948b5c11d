"""webui.py makes OpenMP threads wait passively unless the user set OMP_WAIT_POLICY (issue 20: on a shared
CPU, spinning threads slowed the demo model's first image several-fold)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = ("import runpy, os; runpy.run_path('webui.py', run_name='atelier_probe'); "
         "print(os.environ['OMP_WAIT_POLICY'])")


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_webui_sets_a_passive_omp_wait_policy_unless_given(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == expected
