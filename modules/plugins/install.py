"""Installing extensions from a git URL, and their requirements, behind A1111's safety rule.

Both are refused whenever the server listens beyond localhost (--listen, --server-name
with another address), unless --enable-insecure-extension-access is given: anyone who
can reach the server could otherwise run code on it. Requirements are installed only
when the user asks for it, never as a side effect of installing or loading.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.errors import AtelierError, InvalidParams
from modules.plugins.extensions import NAME_PATTERN, ExtensionInfo, read_folder_metadata

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_URL = re.compile(r"^(https?|ssh|git|file)://[^\s]+$|^[\w.-]+@[\w.-]+:[\w./~-]+$")
Runner = Callable[..., Any]


class ExtensionAccessDenied(AtelierError):
    """Installing code is not allowed while the server is reachable from other machines."""


class FileInstallRefused(ExtensionAccessDenied):
    """A file:// install without --allow-file-extension-install."""


class NotAnExtension(InvalidParams):
    """The repository cloned, but it holds no Atelier extension (no valid extension.toml)."""


class CloneFailed(InvalidParams):
    """git could not clone the URL (wrong address, no such repository, no network)."""


def listens_beyond_localhost(host: str | None) -> bool:
    return bool(host) and host not in LOCAL_HOSTS


def install_refusal(host: str | None, settings: Any) -> str | None:
    """Why installing is refused for a server bound to `host`, or None when it is allowed."""
    if listens_beyond_localhost(host) and not getattr(settings, "enable_insecure_extension_access", False):
        return (f"Installing extensions is disabled because the server listens on {host}, beyond localhost. "
                "Restart with --enable-insecure-extension-access to allow it (anyone who can reach the "
                "server could then run code on this machine).")
    return None


def check_install_allowed(host: str | None, settings: Any) -> None:
    refusal = install_refusal(host, settings)
    if refusal:
        raise ExtensionAccessDenied(refusal)


def name_from_url(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail[:-4] if tail.endswith(".git") else tail


def install_from_git(url: str, settings: Any, host: str | None, name: str | None = None,
                     runner: Runner = subprocess.run, allow_file: bool = False) -> ExtensionInfo:
    """Clone `url` into the first extensions folder; it loads at the next start.

    Only http(s), ssh, git and file URLs (and user@host:path) are accepted; git's `ext::`
    transport and anything that looks like an option are refused. file:// URLs (and git's
    file transport) only with `allow_file` (--allow-file-extension-install).
    """
    check_install_allowed(host, settings)
    url = url.strip()
    if not _URL.match(url) or url.startswith("-"):
        raise InvalidParams(f"Not a git URL Atelier accepts: {url!r} (use https://, ssh://, git:// or file://)")
    if url.startswith("file://") and not allow_file:
        raise FileInstallRefused(f"Installing from a local folder ({url}) is off: restart with "
                                 "--allow-file-extension-install to allow file:// URLs.")
    name = name or name_from_url(url)
    if not NAME_PATTERN.match(name):
        raise InvalidParams(f"Cannot use {name!r} as an extension name (letters, digits, '-' and '_').")
    root = Path(settings.extensions_dirs[0])
    target, staging = root / name, root / f".installing-{name}"
    if target.exists():
        raise InvalidParams(f"An extension named {name!r} is already installed in {target}.")
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    protocols = ["-c", "protocol.ext.allow=never"] + ([] if allow_file else ["-c", "protocol.file.allow=never"])
    done = runner(["git", *protocols, "clone", "--depth", "1", "--", url, str(staging)],
                  capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CloneFailed(f"git clone failed (check the URL): {(done.stderr or done.stdout).strip()[-500:]}")
    info = read_folder_metadata(staging)
    if info.status == "failed":
        shutil.rmtree(staging, ignore_errors=True)
        raise NotAnExtension(f"{url} is not an Atelier extension ({info.error}): an extension has an "
                             "extension.toml with its name and api_version at the top of the repository.")
    staging.rename(target)
    return read_folder_metadata(target)


def install_requirements(info: ExtensionInfo, settings: Any, host: str | None,
                         runner: Runner = subprocess.run) -> str:
    """pip-install an extension's requirements.txt into this Python, when the user asks for it."""
    check_install_allowed(host, settings)
    if info.requirements is None:
        raise InvalidParams(f"Extension {info.name!r} has no requirements file.")
    done = runner([sys.executable, "-m", "pip", "install", "-r", str(info.requirements)],
                  capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise AtelierError(f"pip install failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout
