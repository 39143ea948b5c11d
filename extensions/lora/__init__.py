"""Built-in LoRA / LyCORIS and textual-inversion support, written against the public plugin API only.

Hooks: `register_extra_networks` (LoRA with the `lyco` alias, Textual Inversion and Checkpoints
cards), `patch_model` (the job's `<lora:...>` tags -> copy-on-write weight deltas),
`register_embeddings` (files in models/embeddings and --embeddings-dir) and
`register_ui_sections` (the card browser under the prompt). See docs/extensions.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.plugins import api

from .apply import apply_tags
from .browser import api_router, browser_section, checkpoint_items, embedding_items, lora_items
from .library import LoraLibrary
from .ti import EmbeddingLibrary

log = api.get_logger("lora")
# Scans and parsed files, per set of folders: apps built with the same folders share them.
_LORAS: dict[tuple[Path, ...], LoraLibrary] = {}
_EMBEDDINGS: dict[tuple[Path, ...], EmbeddingLibrary] = {}
# The extra-network specs of every app built in this process, for the preview / metadata routes.
_SPECS: dict[str, list[api.ExtraNetworkSpec]] = {}


def lora_library(settings: Any) -> LoraLibrary:
    roots = tuple(getattr(settings, "lora_folders", ()))
    return _LORAS.setdefault(roots, LoraLibrary(roots))


def embedding_library(settings: Any) -> EmbeddingLibrary:
    roots = tuple(getattr(settings, "embedding_folders", ()))
    return _EMBEDDINGS.setdefault(roots, EmbeddingLibrary(roots))


@api.hookimpl
def register_extra_networks(settings):
    loras, embeddings = lora_library(settings), embedding_library(settings)
    specs = [
        api.ExtraNetworkSpec("lora", "Lora", aliases=("lyco",), items=lambda: lora_items(loras),
                             refresh=loras.refresh, order=20),
        api.ExtraNetworkSpec("textual inversion", "Textual Inversion", items=lambda: embedding_items(embeddings),
                             refresh=lambda: None, tags=False, order=10),
        api.ExtraNetworkSpec("checkpoints", "Checkpoints", items=lambda: checkpoint_items(settings),
                             refresh=lambda: None, tags=False, order=0),
    ]
    for spec in specs:
        _SPECS.setdefault(spec.name, []).append(spec)
    return specs


@api.hookimpl
def patch_model(patch, tags, context):
    lora_tags = tags.get("lora", [])
    if lora_tags:
        apply_tags(patch, lora_tags, lora_library(context.settings), context)


@api.hookimpl
def register_embeddings(settings):
    return embedding_library(settings).specs()


@api.hookimpl
def register_ui_sections(tab):
    return [browser_section(tab)]


@api.hookimpl
def register_api_routes():
    return [api_router(_SPECS)]
