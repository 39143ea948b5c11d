"""Built-in LoRA / LyCORIS and textual-inversion support, written against the public plugin API only.

Hooks: `register_extra_networks` (LoRA with the `lyco` alias, Textual Inversion and Checkpoints
cards), `patch_model` (the job's `<lora:...>` tags -> copy-on-write weight deltas),
`register_embeddings` (files in models/embeddings and --embeddings-dir) and
`register_ui_sections` (the card browser under the prompt). Each app gets its own
`LoraExtension` from `create_plugin`, so two apps in one process share no libraries or specs.
See docs/extensions.md.
"""
from __future__ import annotations

from typing import Any

from modules.plugins import api

from .apply import apply_tags
from .browser import api_router, browser_section, checkpoint_items, embedding_items, lora_items
from .library import LoraLibrary
from .ti import EmbeddingLibrary

log = api.get_logger("lora")


def create_plugin(settings: Any) -> LoraExtension:
    """The plugin one app registers (plugin API 1.2): its libraries and specs belong to that app only."""
    return LoraExtension(settings)


class LoraExtension:
    """One app's LoRA and embedding libraries (scans, parsed files) and its extra-network specs."""

    def __init__(self, settings: Any) -> None:
        self.loras = LoraLibrary(tuple(getattr(settings, "lora_folders", ())))
        self.embeddings = EmbeddingLibrary(tuple(getattr(settings, "embedding_folders", ())))
        # kind -> this app's specs, read by the preview / metadata routes; replaced, never appended to.
        self.specs: dict[str, list[api.ExtraNetworkSpec]] = {}

    @api.hookimpl
    def register_extra_networks(self, settings):
        loras, embeddings = self.loras, self.embeddings
        specs = [
            api.ExtraNetworkSpec("lora", "Lora", aliases=("lyco",), items=lambda: lora_items(loras),
                                 refresh=loras.refresh, order=20),
            api.ExtraNetworkSpec("textual inversion", "Textual Inversion",
                                 items=lambda: embedding_items(embeddings), refresh=lambda: None, tags=False,
                                 order=10),
            api.ExtraNetworkSpec("checkpoints", "Checkpoints", items=lambda: checkpoint_items(settings),
                                 refresh=lambda: None, tags=False, order=0),
        ]
        self.specs.clear()
        self.specs.update((spec.name, [spec]) for spec in specs)
        return specs

    @api.hookimpl
    def patch_model(self, patch, tags, context):
        lora_tags = tags.get("lora", [])
        if lora_tags:
            apply_tags(patch, lora_tags, self.loras, context)

    @api.hookimpl
    def register_embeddings(self):
        return self.embeddings.specs()

    @api.hookimpl
    def register_ui_sections(self, tab):
        return [browser_section(tab)]

    @api.hookimpl
    def register_api_routes(self):
        return [api_router(self.specs)]
