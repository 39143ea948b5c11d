"""Widgets for the server's options (/sdapi/v1/options), by section as A1111's Settings lays them out.

Known options get their A1111 label and a fitting widget; any other option the server holds gets a
widget by its value's type, in "Other". Options the server cannot change while it runs are shown
read-only with the flag that sets them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.errors import AtelierError
from modules.faces.service import KNOWN as _FACE_MODELS
from modules.jobs.overrides import FP8_STORAGE
from modules.pipeline.memory_policy import MODES, T5_CHOICES
from modules.server.options import READ_ONLY, RNG_LABELS
from modules.settings import EMPHASIS_MODES
from modules.ui.components import AUTOMATIC
from modules.ui.context import UIContext

FACE_RESTORERS = list(_FACE_MODELS)
DEFAULT_QUICKSETTINGS = ("sd_model_checkpoint", "sd_vae", "forge_additional_modules", "CLIP_stop_at_last_layers")
MEMORY_CHOICES = {"memory_policy": MODES, "memory_t5_after_encoding": T5_CHOICES}
MEMORY_NUMBERS = ("memory_gpu_weights", "memory_keep_free")
INT_OPTIONS = ("show_progress_every_n_steps", "CLIP_stop_at_last_layers", "eta_noise_seed_delta",
               "interrogate_clip_num_beams", "interrogate_clip_min_length", "interrogate_clip_max_length",
               "interrogate_clip_dict_limit")
SECTIONS = ("Stable Diffusion", "Sampler parameters", "Live previews", "User interface", "Saving images",
            "Interrogate", "Face restoration", "Memory", "Other")
INTERROGATE_LABELS = (  # A1111's Settings > Interrogate
    ("interrogate_keep_models_in_memory", "Keep models in VRAM"),
    ("interrogate_return_ranks", "Include ranks of model tags matches in results"),
    ("interrogate_clip_num_beams", "BLIP: num_beams"),
    ("interrogate_clip_min_length", "BLIP: minimum description length"),
    ("interrogate_clip_max_length", "BLIP: maximum description length"),
    ("interrogate_clip_dict_limit", "CLIP: maximum number of lines in text file (0 = no limit)"),
    ("interrogate_clip_skip_categories", "CLIP: skip inquire categories"),
    ("interrogate_deepbooru_score_threshold", "deepbooru: score threshold"),
    ("deepbooru_sort_alpha", "deepbooru: sort tags alphabetically (if not: by score)"),
    ("deepbooru_use_spaces", "deepbooru: use spaces in tags"),
    ("deepbooru_escape", "deepbooru: escape (\\) brackets"),
    ("deepbooru_filter_tags", "deepbooru: filter out those tags (comma-separated)"),
)
RESTART_FLAGS = {"samples_format": "(PNG with infotext)", "outdir_txt2img_samples":
                 "--outputs-dir", "outdir_img2img_samples": "--outputs-dir"}


@dataclass(frozen=True)
class OptionInfo:
    key: str
    section: str
    label: str


def known_options() -> dict[str, OptionInfo]:
    rows = (
        ("sd_vae", "Stable Diffusion", "SD VAE"),
        ("forge_additional_modules", "Stable Diffusion", "VAE / Text Encoder"),
        ("CLIP_stop_at_last_layers", "Stable Diffusion", "Clip skip"),
        ("emphasis", "Stable Diffusion", "Emphasis mode"),
        ("randn_source", "Stable Diffusion", "Random number generator source"),
        ("fp8_storage", "Stable Diffusion", "FP8 weight (Use FP8 to store Linear/Conv layers' weight; GGUF "
                                            "and fp8 files stay as stored)"),
        ("eta_noise_seed_delta", "Sampler parameters", "Eta noise seed delta (ENSD)"),
        ("atelier_default_sampler", "Sampler parameters", "Default sampler"),
        ("atelier_default_scheduler", "Sampler parameters", "Default schedule type"),
        ("live_previews_enable", "Live previews", "Show live previews of the created image"),
        ("show_progress_every_n_steps", "Live previews", "Live preview display period (every N sampling steps)"),
        ("quicksettings_list", "User interface", "Quicksettings list (setting entries that appear at the top of "
                                                 "page rather than in settings tab; after a restart)"),
        ("keyedit_precision_attention", "User interface", "Ctrl+up/down precision when editing (attention:1.1)"),
        ("samples_format", "Saving images", "File format for images"),
        ("outdir_txt2img_samples", "Saving images", "Output directory for txt2img images"),
        ("outdir_img2img_samples", "Saving images", "Output directory for img2img images"),
        ("face_restoration_model", "Face restoration", "Face restoration model"),
        ("code_former_weight", "Face restoration", "CodeFormer weight (0 = maximum effect, 1 = minimum effect)"),
        ("memory_policy", "Memory", "Memory policy (none: all weights on the GPU; normal: keep what fits, move "
                                   "the rest; low: only the running model, streamed by blocks past the budget)"),
        ("memory_gpu_weights", "Memory", "GPU weights in GiB (-1: free memory minus the free-memory target)"),
        ("memory_keep_free", "Memory", "Free-memory target in GiB (left for activations)"),
        ("memory_t5_after_encoding", "Memory", "T5 after encoding (keep: as the policy says; cpu: back to the CPU; "
                                                   "free: freed, read again from its file)"),
    )
    rows += tuple((key, "Interrogate", label) for key, label in INTERROGATE_LABELS)
    return {key: OptionInfo(key, section, label) for key, section, label in rows}


def option_keys(ui: UIContext) -> list[str]:
    """Every option the server holds (and the UI's own), known ones first; the checkpoint has its own row."""
    known = known_options()
    held = [k for k in ui.server.options.all() if k != "sd_model_checkpoint"]
    return list(known) + sorted(k for k in held if k not in known)


def info_of(key: str) -> OptionInfo:
    return known_options().get(key) or OptionInfo(key, "Other", key)


def option_value(ui: UIContext, key: str) -> Any:
    defaults = {"keyedit_precision_attention": 0.1, "quicksettings_list": list(DEFAULT_QUICKSETTINGS),
                "atelier_default_sampler": ui.default("sampler", "DPM++ 2M"),
                "atelier_default_scheduler": ui.default("scheduler", AUTOMATIC)}
    return ui.server.options.get(key, defaults.get(key))


def option_widget(ui: UIContext, key: str, elem_id: str, compact: bool = False) -> gr.components.Component:
    """The widget of one option, with its current value (`compact`: the top bar's, radios as dropdowns)."""
    label, value, registries = info_of(key).label, option_value(ui, key), ui.app.registries
    if key in READ_ONLY:
        flag = RESTART_FLAGS.get(key, "a flag")
        note = f"{label} ({flag})" if compact else f"{label} (set at start-up with {flag})"
        return gr.Textbox(str(value), label=note, interactive=False, elem_id=elem_id)
    common = {"label": label, "elem_id": elem_id}
    if key in ("sd_vae", "forge_additional_modules"):
        return component_widget(ui, key, value, common)
    if key == "CLIP_stop_at_last_layers":
        return gr.Slider(1, 12, value=value or 1, step=1, **common)
    if key == "show_progress_every_n_steps":
        return gr.Slider(1, 50, value=value or 1, step=1, **common)
    if key == "keyedit_precision_attention":
        return gr.Slider(0.01, 0.2, value=value, step=0.001, **common)
    if key == "code_former_weight":
        return gr.Slider(0, 1, value=0.5 if value is None else value, step=0.01, **common)
    if key == "interrogate_deepbooru_score_threshold":
        return gr.Slider(0.0, 1.0, value=value, step=0.01, **common)
    if key == "interrogate_clip_skip_categories":
        return gr.Dropdown(["artists", "mediums", "movements", "flavors"], value=list(value or []),
                           multiselect=True, allow_custom_value=True, **common)
    choice = gr.Dropdown if compact else gr.Radio
    if key == "face_restoration_model":
        return choice(FACE_RESTORERS, value=value or "CodeFormer", **common)
    if key == "randn_source":
        return choice(list(RNG_LABELS.values()), value=value or "GPU", **common)
    if key == "emphasis":
        return choice(list(EMPHASIS_MODES), value=value or "Original", **common)
    if key == "fp8_storage":
        return choice(list(FP8_STORAGE), value=value or "Disable", **common)
    if key in MEMORY_CHOICES:
        return choice(list(MEMORY_CHOICES[key]), value=value, **common)
    if key in MEMORY_NUMBERS:
        return gr.Number(value, **common)
    if key == "atelier_default_sampler":
        return gr.Dropdown(registries.samplers.names(), value=value, **common)
    if key == "atelier_default_scheduler":
        return gr.Dropdown([AUTOMATIC, *registries.schedulers.names()], value=value, **common)
    if key == "quicksettings_list":
        return gr.Dropdown(["sd_model_checkpoint", *option_keys(ui)], value=list(value or []), multiselect=True,
                           **common)
    return _generic(value, common)


def _generic(value: Any, common: dict) -> gr.components.Component:
    if isinstance(value, bool):
        return gr.Checkbox(value, **common)
    if isinstance(value, int | float):
        return gr.Number(value, precision=0 if isinstance(value, int) else None, **common)
    if isinstance(value, list):
        return gr.Dropdown([str(v) for v in value], value=[str(v) for v in value], multiselect=True,
                           allow_custom_value=True, **common)
    return gr.Textbox("" if value is None else str(value), **common)


def coerce_option(key: str, value: Any) -> Any:
    if key in MEMORY_NUMBERS and value is not None:
        return float(value)
    if key in INT_OPTIONS and value is not None:
        return int(value)
    if key == "keyedit_precision_attention" and value is not None:
        return round(float(value), 3)
    return value


def save_options(ui: UIContext, values: dict[str, Any]) -> str:
    """Apply changed options (read-only ones are left out); returns the message to show."""
    changes = {k: coerce_option(k, v) for k, v in values.items() if k not in READ_ONLY}
    changes = {k: v for k, v in changes.items() if ui.server.options.get(k) != v}
    try:
        ui.server.options.update(changes)
    except (AtelierError, OSError, ValueError) as err:
        return f"**Not saved:** {err}"
    if not changes:
        return "Nothing changed."
    return (f"Saved {len(changes)} setting(s) to `{ui.server.options.path.name}`: {', '.join(sorted(changes))}. "
            "New jobs use them.")


def may_change(ui: UIContext, request: Any) -> bool:
    server = ui.server
    return not (server.config.credentials and server.config.admin_users and not ui.caller(request).admin)


def sd_vae_choices(ui: UIContext) -> list[str]:
    vae_dir = ui.app.settings.vae_dir
    return ["Automatic", "None", *(p.relative_to(vae_dir).as_posix() for p in ui.app.engine.vaes())]


def module_choices(ui: UIContext) -> list[str]:
    """Forge's picker: files in models/VAE, then in models/text_encoder (by name; paths never leave the server)."""
    from modules.checkpoints.components import module_files

    settings = ui.app.settings
    names = [f.relative_to(d).as_posix() for d, f in module_files([settings.vae_dir], settings.text_encoder_dirs)]
    return list(dict.fromkeys(names))


def component_widget(ui: UIContext, key: str, value: Any, common: dict) -> gr.Dropdown:
    """SD VAE (one of Automatic, None, a file) or the VAE / Text Encoder picker (several files)."""
    if key == "sd_vae":
        choices = sd_vae_choices(ui)
        return gr.Dropdown(choices, value=value if value in choices else "Automatic", **common)
    value = [str(v) for v in value or []]
    return gr.Dropdown(list(dict.fromkeys([*module_choices(ui), *value])), value=value, multiselect=True,
                       min_width=320, scale=2, **common)
