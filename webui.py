#!/usr/bin/env python3
"""Atelier launcher: arguments -> Settings -> App -> run. No logic here."""
import sys

from modules.cli import main

if __name__ == "__main__":
    sys.exit(main())
