"""A1111-style options (GET/POST /sdapi/v1/options) and per-job `override_settings`.

Options are the server's defaults for new jobs. A job copies what it needs when it is
submitted; `override_settings` produces a new params object for that job only
(`dataclasses.replace`), and nothing global is changed and restored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams
from modules.settings import Settings

log = logging.getLogger(__name__)

# A1111 option key -> params field it sets for a job.
PARAM_OPTIONS = {
    "CLIP_stop_at_last_layers": "clip_skip",
    "eta_noise_seed_delta": "eta_noise_seed_delta",
    "randn_source": "rng_source",
    "emphasis": "emphasis",
}
RNG_LABELS = {"gpu": "GPU", "cpu": "CPU", "nv": "NV"}
READ_ONLY = ("sd_vae", "outdir_txt2img_samples", "outdir_img2img_samples", "samples_format")


def _option_to_param(key: str, value: Any) -> Any:
    if key == "randn_source":
        value = str(value).lower()
        if value not in RNG_LABELS:
            raise InvalidParams(f"randn_source must be one of GPU, CPU, NV, got {value!r}")
    if key in ("CLIP_stop_at_last_layers", "eta_noise_seed_delta") and (
            isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidParams(f"{key} must be a whole number, got {value!r}")
    return value


class Options:
    """The option values, persisted atomically to `<data>/config.json` (A1111's name for its settings)."""

    def __init__(self, settings: Settings, path: Path, legacy_path: Path | None = None) -> None:
        self.path = Path(path)
        self.legacy_path = legacy_path  # read when `path` does not exist yet (older data folders)
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sd_model_checkpoint": None,
            "sd_vae": settings.sd_vae,
            "CLIP_stop_at_last_layers": settings.clip_skip,
            "eta_noise_seed_delta": settings.eta_noise_seed_delta,
            "randn_source": RNG_LABELS.get(settings.rng_source, settings.rng_source),
            "emphasis": settings.emphasis,
            "samples_format": "png",
            "outdir_txt2img_samples": str(settings.outputs_dir / "txt2img-images"),
            "outdir_img2img_samples": str(settings.outputs_dir / "img2img-images"),
            "show_progress_every_n_steps": settings.preview_every,
            "live_previews_enable": True,
        }
        self._values.update(self._load())

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

    def all(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def validate(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key in PARAM_OPTIONS:
                _option_to_param(key, value)
            elif key in READ_ONLY and value != self.get(key):
                raise InvalidParams(f"{key} cannot be changed while the server runs (it is {self.get(key)!r})")

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

    def job_defaults(self, param_fields: set[str]) -> dict[str, Any]:
        """Params fields that come from the options, e.g. clip_skip from CLIP_stop_at_last_layers."""
        values = self.all()
        return {field: _option_to_param(key, values[key]) for key, field in PARAM_OPTIONS.items()
                if field in param_fields and key in values}


def apply_overrides(params, overrides: dict[str, Any]) -> tuple[Any, list[str]]:
    """A new params object with the job's `override_settings`; returns it and warnings for ignored keys."""
    names = {f.name for f in dataclasses.fields(params)}
    changes, ignored = {}, []
    for key, value in overrides.items():
        field = PARAM_OPTIONS.get(key)
        if field in names:
            changes[field] = _option_to_param(key, value)
        elif key != "sd_model_checkpoint":
            ignored.append(key)
    warnings = [f"override_settings ignored (not a per-job setting here): {', '.join(ignored)}"] if ignored else []
    return dataclasses.replace(params, **changes), warnings
