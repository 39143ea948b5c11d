"""Job-time extra networks: prompt tags -> `patch_model` hooks -> a copy-on-write ModelPatch,
and `register_embeddings` -> textual-inversion embeddings fitted to the loaded model.

Tags are taken from the job's prompt and negative prompt (after `prepare_params`); each is
routed to the extra-network spec whose name or alias it uses. A tag naming no registered
network is ignored with a warning on the result. The prompt text the encoders see never
contains tags (`PromptConditioner` strips them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from modules.plugins.context import JobContext
from modules.plugins.host import PluginHost
from modules.plugins.patch import ModelPatch
from modules.text.embeddings import EmbeddingLookup, TokenEmbedding, fit_embedding
from modules.text.prompt_parser import ExtraNetworkTag, extract_extra_networks

log = logging.getLogger("atelier.networks")


def prompt_tags(params: Any) -> list[ExtraNetworkTag]:
    """The tags of the job's prompt, then of its negative prompt, in order."""
    tags: list[ExtraNetworkTag] = []
    for text in (params.prompt, params.negative_prompt):
        tags.extend(extract_extra_networks(text or "")[1])
    return tags


def route_tags(tags: list[ExtraNetworkTag], registry: Any, context: JobContext) -> dict[str, list[ExtraNetworkTag]]:
    """Tags by the name of the extra-network spec they address (aliases resolved)."""
    routed: dict[str, list[ExtraNetworkTag]] = {}
    for tag in tags:
        spec = registry.get(tag.name) if tag.name in registry else None
        if spec is None or not spec.tags:
            context.warn(f"Unknown extra network <{tag.name}:...>: no extension handles it; ignored")
            continue
        routed.setdefault(spec.name, []).append(tag)
    return routed


def build_patch(host: PluginHost, model: Any, params: Any, context: JobContext) -> ModelPatch:
    """Call every `patch_model` hook; a failing one fails the job if the prompt uses its networks."""
    patch = ModelPatch(model)
    tags = route_tags(prompt_tags(params), context.registries.extra_networks, context)
    users = {host.owners.get(("extra network", name)) for name in tags}
    for impl in host.implementations("patch_model"):
        ok, value = host.call_one("patch_model", impl,
                                  {"patch": patch, "tags": tags, "params": params, "context": context},
                                  strict=impl.plugin_name in users)
        if not ok:
            context.warn(f"Extension {impl.plugin_name!r} failed in patch_model and was skipped: {value.message}")
    return patch


@dataclass
class FittedEmbeddings:
    """Embeddings for one model: those that fit, and why the others were skipped."""

    loaded: dict[str, TokenEmbedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    specs: dict[str, Any] = field(default_factory=dict)  # every EmbeddingSpec by name, for the API


def fit_embeddings(host: PluginHost, settings: Any, model: Any) -> FittedEmbeddings:
    """Collect `register_embeddings` and check each against the model's text encoders."""
    flavours = [spec.flavour for spec in model.spec.text_encoders]
    widths = [int(spec.config["hidden_size"]) for spec in model.spec.text_encoders]
    fitted = FittedEmbeddings()
    for plugin, spec in host.specs("register_embeddings", settings=settings):
        if spec.name in fitted.specs:
            log.warning("embedding %r from %s is a duplicate name; the first one is kept", spec.name, plugin)
            continue
        fitted.specs[spec.name] = spec
        embedding, reason = fit_embedding(spec, flavours, widths)
        if embedding is None:
            fitted.skipped[spec.name] = reason
        else:
            fitted.loaded[spec.name] = embedding
    return fitted


def job_embeddings(host: PluginHost, settings: Any, model: Any, tokenizer: Any, params: Any,
                   context: JobContext) -> EmbeddingLookup | None:
    """The job's trigger-word lookup; a skipped embedding named in the prompts gets a visible warning."""
    fitted = fit_embeddings(host, settings, model)
    words = f" {params.prompt} {params.negative_prompt} ".lower()
    for name, reason in fitted.skipped.items():
        if name.lower() in words:
            context.warn(f"Textual inversion embedding {name!r} skipped: {reason}")
    if not fitted.loaded:
        return None
    return EmbeddingLookup(fitted.loaded.values(), tokenizer)


def ti_hashes(lookup: EmbeddingLookup | None) -> str | None:
    """A1111's `TI hashes` value for the embeddings a job's prompts used."""
    if lookup is None or not lookup.used:
        return None
    return ", ".join(f"{name}: {e.hash}" for name, e in lookup.used.items() if e.hash) or None
