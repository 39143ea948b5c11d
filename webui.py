#!/usr/bin/env python3
"""Atelier launcher: arguments -> Settings -> App -> run. No logic here."""
import os
import sys

# OpenMP threads that wait by sleeping, not spinning, unless the user chose: on a CPU shared with the browser
# or other work, spinning threads fight over the cores (docs/performance.md, "Launch time"). Read when torch
# loads, so it is set before any import of torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modules.cli import main

if __name__ == "__main__":
    sys.exit(main())
