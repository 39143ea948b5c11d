"""A1111 options that a job may take as its own: the whitelist behind `override_settings`.

The server's options are defaults for new jobs. A job reads the whitelisted ones when it is
submitted (`job_defaults`), and `override_settings` may change exactly these for that job
(`overridden`). Limits (max size, batch, steps) are server policy and are never options.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modules.errors import InvalidParams

# A1111 option key -> the params field it sets for a job.
PARAM_OPTIONS = {
    "CLIP_stop_at_last_layers": "clip_skip",
    "eta_noise_seed_delta": "eta_noise_seed_delta",
    "randn_source": "rng_source",
    "emphasis": "emphasis",
    "face_restoration_model": "face_restoration_model",
    "code_former_weight": "code_former_weight",
    "img2img_extra_noise": "img2img_extra_noise",
}
RNG_LABELS = {"gpu": "GPU", "cpu": "CPU", "nv": "NV"}
NOT_OVERRIDES = ("sd_model_checkpoint", "fp8_storage")  # handled by the submit service itself
FP8_STORAGE = {"Disable": "auto", "Enable": "fp8", "Enable for SDXL": "fp8-sdxl"}  # A1111's "FP8 weight"
COMPONENT_OPTIONS = ("sd_vae", "forge_additional_modules")  # the job's VAE / text encoders (submit service)


def options_from_settings(settings: Any) -> dict[str, Any]:
    """The per-job options' process defaults (the --clip-skip, --rng, --emphasis and ENSD flags)."""
    return {"CLIP_stop_at_last_layers": settings.clip_skip, "eta_noise_seed_delta": settings.eta_noise_seed_delta,
            "randn_source": RNG_LABELS.get(settings.rng_source, settings.rng_source), "emphasis": settings.emphasis,
            "face_restoration_model": "CodeFormer", "code_former_weight": 0.5}


def option_to_param(key: str, value: Any) -> Any:
    """An option's value as its params field holds it; raises InvalidParams naming the option."""
    if key == "randn_source":
        value = str(value).lower()
        if value not in RNG_LABELS:
            raise InvalidParams(f"randn_source must be one of GPU, CPU, NV, got {value!r}", field=key)
    if key in ("CLIP_stop_at_last_layers", "eta_noise_seed_delta") and (
            isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidParams(f"{key} must be a whole number, got {value!r}", field=key)
    if key in ("emphasis", "face_restoration_model") and not isinstance(value, str):
        raise InvalidParams(f"{key} must be text, got {value!r}", field=key)
    if key == "code_former_weight" and (isinstance(value, bool) or not isinstance(value, int | float)
                                        or not 0 <= value <= 1):
        raise InvalidParams(f"code_former_weight must be a number between 0 and 1, got {value!r}", field=key)
    if key == "img2img_extra_noise" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidParams(f"{key} must be a number, got {value!r}", field=key)
    return value


def job_defaults(options: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """Params fields that come from the options, e.g. clip_skip from CLIP_stop_at_last_layers."""
    return {field: option_to_param(key, options[key]) for key, field in PARAM_OPTIONS.items()
            if field in names and key in options}


def overridden(overrides: Mapping[str, Any], names: frozenset[str]) -> tuple[dict[str, Any], list[str]]:
    """The params fields a job's `override_settings` sets, and a warning for keys that are not per-job."""
    changes, ignored = {}, []
    for key, value in overrides.items():
        field = PARAM_OPTIONS.get(key)
        if field in names:
            changes[field] = option_to_param(key, value)
        elif key not in NOT_OVERRIDES and key not in COMPONENT_OPTIONS:
            ignored.append(key)
    warnings = [f"override_settings ignored (not a per-job setting here): {', '.join(ignored)}"] if ignored else []
    return changes, warnings


def fp8_storage_option(settings: Any) -> str:
    """The fp8_storage option's process default, from --weights."""
    return next((label for label, mode in FP8_STORAGE.items() if mode == settings.weights), "Disable")


def job_weights(options: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    """The weights mode a job loads its checkpoint with ("" when the option is unset)."""
    value = overrides.get("fp8_storage", options.get("fp8_storage"))
    if value is None:
        return ""
    if isinstance(value, bool):  # some clients send the checkbox value
        value = "Enable" if value else "Disable"
    if value not in FP8_STORAGE:
        raise InvalidParams(f"fp8_storage must be one of {', '.join(FP8_STORAGE)}, got {value!r}", field="fp8_storage")
    return FP8_STORAGE[value]


def job_components(options: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The job's `sd_vae` and `forge_additional_modules`: the caller's options, then `override_settings`."""
    return {key: overrides.get(key, options.get(key)) for key in COMPONENT_OPTIONS
            if key in overrides or key in options}
