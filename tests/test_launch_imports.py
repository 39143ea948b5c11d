"""The page is served before the heavy model libraries load: building the UI never imports them.

transformers alone takes about a second to import; it and diffusers load with the first model (in
the background preload), so a second launch serves the page sooner (bench/launch.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_building_the_web_ui_imports_neither_transformers_nor_diffusers():
    code = ("import sys\n"
            "from modules.cli import build_parser\n"
            "from modules.app import build_app\n"
            "from modules.settings import settings_from_args\n"
            "from modules.server.app import create_app\n"
            "from modules.server.config import server_config_from_args\n"
            "from modules.server.context import build_context\n"
            "from modules.ui.mount import mount_webui\n"
            "import tempfile\n"
            "args = build_parser().parse_args(['--data-dir', tempfile.mkdtemp(), '--lazy-load'])\n"
            "create_app(build_context(build_app(settings_from_args(args)), server_config_from_args(args)), "
            "mount_webui)\n"
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
