"""Per-user defaults for the per-job options (CLIP skip, ENSD, RNG source, emphasis), under auth.

With logins on, the server's options are admin-only; each user may still choose the options
that a job may take as its own (`modules.jobs.overrides.PARAM_OPTIONS`). They are stored in
`<data>/users/<name>/config.json` and apply to that user's jobs only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules.jobs.overrides import PARAM_OPTIONS, option_to_param

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def user_folder_name(user: str) -> str:
    """A folder name for `user`: the name itself when plainly safe, else a digest (no '..', '/', ':')."""
    if _SAFE_NAME.match(user):
        return user
    return "user-" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:24]


class UserOptions:
    """Each user's choices among PARAM_OPTIONS, persisted atomically, one file per user."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def path_for(self, user: str) -> Path:
        return self.root / user_folder_name(user) / "config.json"

    def get(self, user: str) -> dict[str, Any]:
        """The user's saved values (whitelisted keys only); an unreadable file counts as none."""
        path = self.path_for(user)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("Ignoring %s: %s", path, err)
            return {}
        return {k: v for k, v in data.items() if k in PARAM_OPTIONS} if isinstance(data, dict) else {}

    def update(self, user: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate (InvalidParams names the option), merge and save; returns the user's values."""
        for key, value in changes.items():
            if key not in PARAM_OPTIONS:
                raise KeyError(key)
            option_to_param(key, value)
        with self._lock:
            values = {**self.get(user), **changes}
            path = self.path_for(user)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(values, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        return values
