"""A1111-style options (GET/POST /sdapi/v1/options), persisted in the data folder.

Options are the server's defaults for new jobs. The per-job whitelist (which options a job
reads, and which `override_settings` may change) lives in `modules.jobs.overrides`; nothing
global is changed and restored for a job.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.checkpoints.components import ComponentChoice, find_sd_vae, pick_modules
from modules.errors import CheckpointError, InvalidParams
from modules.interrogate.options import InterrogateOptions
from modules.jobs.overrides import (
    COMPONENT_OPTIONS,
    PARAM_OPTIONS,
    RNG_LABELS,
    fp8_storage_option,
    job_weights,
    option_to_param,
    options_from_settings,
)
from modules.pipeline.memory_policy import OPTION_KEYS as MEMORY_OPTIONS
from modules.pipeline.memory_policy import policy_from_options, policy_from_settings, policy_options
from modules.plugins.grids import GRID_OPTION_DEFAULTS, grid_options
from modules.settings import Settings

__all__ = ["Options", "RNG_LABELS"]

log = logging.getLogger(__name__)

READ_ONLY = ("outdir_txt2img_samples", "outdir_img2img_samples", "samples_format")


class Options:
    """The option values, persisted atomically to `<data>/config.json` (A1111's name for its settings)."""

    def __init__(self, settings: Settings, path: Path, legacy_path: Path | None = None) -> None:
        self.path = Path(path)
        self.legacy_path = legacy_path  # read when `path` does not exist yet (older data folders)
        self.load_error: str | None = None
        self._settings = settings
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sd_model_checkpoint": None,
            "sd_vae": settings.sd_vae,
            "forge_additional_modules": [],
            **options_from_settings(settings),
            "samples_format": "png",
            "outdir_txt2img_samples": str(settings.outputs_dir / "txt2img-images"),
            "outdir_img2img_samples": str(settings.outputs_dir / "img2img-images"),
            "show_progress_every_n_steps": settings.preview_every,
            "live_previews_enable": True,
            **GRID_OPTION_DEFAULTS,
            **InterrogateOptions().to_json(),
            "fp8_storage": fp8_storage_option(settings),
            **policy_options(policy_from_settings(settings)),
        }
        self._values.update(self._load())
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with the changes after each update
        self.validators: list[Callable[[dict[str, Any]], None]] = []  # called with the changes before; may raise
        self._drop_missing_components(settings)

    def _load(self) -> dict[str, Any]:
        """The saved values; a corrupt file is moved aside (reported in `load_error`), never fatal."""
        path = self.path if self.path.exists() or self.legacy_path is None else self.legacy_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            self.load_error = f"Cannot read {path}: {err}; using defaults."
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("the file does not hold a JSON object")
        except ValueError as err:
            backup = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, backup)
            self.load_error = (f"{path.name} was not valid ({err}); it was moved to {backup.name} "
                               "and the defaults are used.")
            log.warning("%s", self.load_error)
            return {}
        return {k: v for k, v in data.items() if k not in READ_ONLY}

    def _drop_missing_components(self, settings: Settings) -> None:
        """A saved VAE / text encoder choice whose file is gone falls back to the defaults (logged), so that
        a deleted file does not refuse every job."""
        try:
            check_components(settings, self._values)
        except InvalidParams as err:
            log.warning("%s; using sd_vae %s and no VAE / text encoder picks", err, settings.sd_vae)
            self._values.update({"sd_vae": settings.sd_vae, "forge_additional_modules": []})

    def all(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def validate(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key in PARAM_OPTIONS:
                option_to_param(key, value)
            elif key in READ_ONLY and value != self.get(key):
                raise InvalidParams(f"{key} cannot be changed while the server runs (it is {self.get(key)!r})")
        if any(key in InterrogateOptions.__dataclass_fields__ for key in changes):
            InterrogateOptions.from_options({**self.all(), **changes})
        if "fp8_storage" in changes:
            job_weights({}, changes)
        if any(key in MEMORY_OPTIONS for key in changes):
            policy_from_options({**self.all(), **changes})
        if any(key in COMPONENT_OPTIONS for key in changes):
            check_components(self._settings, {**self.all(), **changes})
        if any(key in GRID_OPTION_DEFAULTS for key in changes):
            try:
                grid_options({**self.all(), **changes})
            except ValueError as err:
                raise InvalidParams(str(err)) from None
        for validator in list(self.validators):
            validator(changes)

    def update(self, changes: dict[str, Any]) -> None:
        """Validate, apply and persist (write a temporary file, then rename)."""
        self.validate(changes)
        with self._lock:
            self._values.update(changes)
            data = {k: v for k, v in self._values.items() if k not in READ_ONLY}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
            os.replace(tmp, self.path)
        for listener in list(self.listeners):
            listener(changes)


def check_components(settings: Settings, values: dict[str, Any]) -> None:
    """`sd_vae` names Automatic, None or a file in models/VAE, and every `forge_additional_modules` entry
    a file in models/VAE or models/text_encoder; raises InvalidParams naming the option."""
    key = "sd_vae"
    try:
        choice = ComponentChoice.from_options(values)
        find_sd_vae(choice.sd_vae, settings.vae_dir)
        key = "forge_additional_modules"
        pick_modules(choice.modules, (settings.vae_dir,), settings.text_encoder_dirs)
    except CheckpointError as err:
        raise InvalidParams(str(err), field=key) from None
