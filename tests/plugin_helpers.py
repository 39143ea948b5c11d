"""Helpers for the plugin tests: settings and apps that load the fixture extension pack."""
from __future__ import annotations

import subprocess
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


def git_extension_repo(repo: Path) -> str:
    """A git repository at `repo` holding a valid extension "hello-ext" (it adds the style "Hello"),
    as a file:// URL: installs are tested with no network."""
    repo.mkdir(parents=True)
    (repo / "extension.toml").write_text('name = "hello-ext"\nversion = "0.2"\napi_version = "1.0"\n')
    (repo / "extension.py").write_text("from modules.plugins import api\n\n@api.hookimpl\ndef register_styles():\n"
                                       "    return [api.StyleSpec('Hello', '{prompt}, hello')]\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return repo.as_uri()
