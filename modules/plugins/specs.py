"""Spec classes that `register_*` hooks return.

Specs are plain frozen dataclasses: a name as users see it, aliases, a function
and option defaults. Built-in samplers and schedules use the same specs as
extensions do.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# defined in the sampling layer (which must not import plugins), re-exported for api.py
from modules.sampling.specs import SamplerSpec as SamplerSpec
from modules.sampling.specs import ScheduleContext as ScheduleContext
from modules.sampling.specs import SchedulerSpec as SchedulerSpec


@dataclass(frozen=True)
class StyleSpec:
    """A prompt style: text merged into the prompt, at `{prompt}` when the style has one."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    source: str = ""  # where it came from ("styles.csv", an extension's name), for the UI


@dataclass(frozen=True)
class OptionSpec:
    """One user-facing option of a post-processor or UI section, rendered by the UI and written to infotext.

    `kind` is "checkbox", "slider", "number", "dropdown" or "text". `infotext` is the
    infotext key; empty means "<owner label> <label>".
    """

    name: str
    label: str
    default: Any
    kind: str = "number"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    infotext: str = ""


@dataclass(frozen=True)
class PostprocessorSpec:
    """An image post-processor that runs after decoding, in `order` (lower first).

    `function(image, params, context) -> image` takes and returns a PIL image;
    `context.options` holds this job's option values. It runs when the job's
    `extension_args` has an entry named `name` (its `enabled` option not False),
    or on every job when `always_on` is set.
    """

    name: str
    label: str
    function: Callable[..., Any]
    options: tuple[OptionSpec, ...] = ()
    order: int = 100
    always_on: bool = False


@dataclass(frozen=True)
class UISectionSpec:
    """A block of controls in the txt2img or img2img tab; values reach `extension_args[name]`.

    Declared `options` are rendered by the UI itself; `build(context)`, when given,
    builds custom Gradio components inside the section and returns them by option name.
    `paste(fields)`, when given, turns parsed infotext fields ({"ControlNet 0": "Module: ...", ...})
    into values by option/component name, for PNG Info's and History's "send to" buttons.
    """

    name: str
    title: str
    tabs: tuple[str, ...] = ("txt2img", "img2img")
    options: tuple[OptionSpec, ...] = ()
    build: Callable[..., Any] | None = None
    order: int = 100
    paste: Callable[..., Any] | None = None


@dataclass(frozen=True)
class UITabSpec:
    """A whole top-level tab; `build(context)` creates its Gradio components."""

    name: str
    title: str
    build: Callable[..., Any]
    order: int = 100


@dataclass(frozen=True)
class RootRoutesSpec:
    """A FastAPI router served at a top-level `prefix` ("/controlnet"), for clients of another project's API.

    The prefix is one segment of letters, digits, "-" and "_"; Atelier's own prefixes are refused,
    and the first extension to claim a prefix keeps it.
    """

    prefix: str
    router: Any


@dataclass(frozen=True)
class UpscalerSpec:
    """An upscaler for the hires fix, by A1111's name ("Latent", "Lanczos", ...).

    A latent upscaler sets `latent_mode` (a `torch.nn.functional.interpolate` mode, with
    `antialias`) and resizes latents. A pixel upscaler sets `function(image, scale) -> image`,
    which returns the PIL image about `scale` times larger; the pipeline then resizes the
    result to the exact target size with Lanczos, as A1111 does. Model upscalers (ESRGAN, ...)
    from extensions are pixel upscalers.
    """

    name: str
    function: Callable[[Any, float], Any] | None = None
    latent_mode: str | None = None
    antialias: bool = False
    aliases: tuple[str, ...] = ()
    model_path: str | None = None  # a model upscaler's file (/sdapi/v1/upscalers)
    scale: float = 4  # its native scale, as A1111 lists it

    def __post_init__(self) -> None:
        if (self.function is None) == (self.latent_mode is None):
            raise ValueError(f"upscaler {self.name!r} needs exactly one of function and latent_mode")

    @property
    def is_latent(self) -> bool:
        return self.latent_mode is not None


@dataclass(frozen=True)
class ExtraNetworkItem:
    """One card of the extra-networks browser (a LoRA file, an embedding, a checkpoint).

    `prompt` is the text a click inserts ("<lora:name:0.8>", an embedding's trigger word);
    empty means the card is not inserted into the prompt (checkpoints). `metadata()`, when
    given, reads the file's training metadata on demand (it may be slow).
    """

    name: str
    path: str = ""
    folder: str = ""  # subfolder relative to the network's root folder, "/"-separated ("" at the top)
    prompt: str = ""
    alias: str = ""
    preview: str | None = None  # path of NAME.preview.png (or .jpg/.webp) when one exists
    description: str = ""
    activation_text: str = ""  # from NAME.json, appended to the prompt on click
    preferred_weight: float | None = None  # from NAME.json; None means 1.0
    search_terms: tuple[str, ...] = ()
    metadata: Callable[[], Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class ExtraNetworkSpec:
    """A kind of extra network: prompt tags `<name:...>` (and `aliases`) are routed to it.

    `items()` lists its browser cards and `refresh()` rescans its folders. With `tags=False`
    the spec only supplies cards (textual inversion, checkpoints): no prompt tag names it.
    The job-time work happens in `patch_model`, which receives the tags by spec name.
    """

    name: str
    title: str
    aliases: tuple[str, ...] = ()
    items: Callable[[], list[ExtraNetworkItem]] | None = None
    refresh: Callable[[], Any] | None = None
    tags: bool = True
    order: int = 100


@dataclass(frozen=True)
class EmbeddingSpec:
    """A textual-inversion embedding: a trigger word and its vectors.

    `vectors` maps a text-encoder flavour to a `[n_vectors, width]` tensor: "clip_l" and
    "clip_g" for SDXL files, "" for single-encoder files (SD1, SD2). The engine checks the
    widths against the loaded model and skips a misfit with a warning.
    """

    name: str
    vectors: Mapping[str, torch.Tensor]
    hash: str = ""  # sha256 of the file, first 12 hex digits (A1111's "TI hashes")
    path: str = ""
    step: int | None = None
    checkpoint: str | None = None  # the sd_checkpoint hash recorded in the file, if any
    checkpoint_name: str | None = None

    @property
    def n_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0]) if self.vectors else 0
