"""Helpers for the plugin tests: settings and apps that load the fixture extension pack."""
from __future__ import annotations

from pathlib import Path

from modules.settings import REPO_ROOT, Settings

FIXTURES = REPO_ROOT / "tests" / "extension_fixtures"
BUNDLED = REPO_ROOT / "extensions"


def ext_settings(tmp_path: Path, dirs=(BUNDLED, FIXTURES), **overrides) -> Settings:
    options = dict(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs", data_dir=tmp_path / "data",
                   device="cpu", precision="fp32", extensions_dirs=tuple(dirs), styles_file=tmp_path / "styles.csv")
    return Settings(**{**options, **overrides})


def ext_app(tmp_path: Path, **overrides):
    from modules.app import build_app

    return build_app(ext_settings(tmp_path, **overrides))


def statuses(app) -> dict[str, str]:
    return {info.name: info.status for info in app.plugins.extensions}
