"""`<lora:...>` tags -> weight deltas on the job's ModelPatch, warnings and the `Lora hashes` infotext."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modules.plugins import api

from . import weights
from .keys import (
    lora_architecture,
    model_architecture,
    module_index,
    original_index,
    resolve_target,
    split_key,
)
from .library import LoraFileError, LoraLibrary


@dataclass(frozen=True)
class LoraRequest:
    """One tag: `<lora:NAME:TE[:UNET]>` or named `te=`/`unet=` (UNET defaults to TE, TE to 1)."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_tag(tag: api.ExtraNetworkTag) -> LoraRequest:
    """A1111's rules: positional NAME, TE, UNET (, DYN); `te=`, `unet=` override; DYN is ignored."""
    positional = [a for a in tag.args if "=" not in a]
    named = dict(a.split("=", 1) for a in tag.args if "=" in a)
    if not positional or not positional[0].strip():
        raise ValueError(f"<{tag.name}:{':'.join(tag.args)}> names no network")
    te = float(positional[1]) if len(positional) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(positional[2]) if len(positional) > 2 else te
    unet = float(named.get("unet", unet))
    return LoraRequest(positional[0].strip(), te, unet)


def group_layers(tensors: Mapping[str, Any]) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], int]:
    """File keys -> {(target, flat module): {param: tensor}}, and how many keys named nothing known."""
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = 0
    for key, value in tensors.items():
        split = split_key(key) if isinstance(value, torch.Tensor) else None
        if split is None:
            unknown += 1
            continue
        target, module, param = split
        layers[(target, module)][param] = value
    return dict(layers), unknown


@dataclass
class Outcome:
    applied: int = 0
    total: int = 0
    missing: int = 0  # layers naming a module this model does not have
    misfit: int = 0  # layers whose shapes do not fit
    unsupported: set[str] | None = None


def _add_fused(patch: api.ModelPatch, target: str, parts: dict[str, torch.Tensor],
               params: Mapping[str, torch.Tensor], multiplier: float) -> None:
    """One layer on an original-layout fused weight (FLUX `qkv`, `linear1`): its delta's rows, split."""
    first = patch.weight(target, next(iter(parts)))
    rows = sum(len(index) for index in parts.values())
    update = weights.delta(params, torch.Size((rows, *first.shape[1:])))
    if multiplier != 0:
        for module, index in parts.items():
            patch.add(target, module, update[index] * multiplier)


def add_lora(patch: api.ModelPatch, index: dict[str, dict[str, str]], tensors: Mapping[str, Any],
             request: LoraRequest) -> Outcome:
    """Queue every layer's `multiplier * delta`; layers that do not fit are counted, never fatal."""
    layers, _ = group_layers(tensors)
    outcome = Outcome(total=len(layers), unsupported=set())
    fused = original_index(patch)
    for (label, flat), params in layers.items():
        target = resolve_target(label, patch)
        module = index.get(target, {}).get(flat)
        if module is None and not (target == "unet" and flat in fused):
            outcome.missing += 1
            continue
        multiplier = request.unet if target == "unet" else request.te
        try:
            if module is None:
                _add_fused(patch, target, fused[flat], params, multiplier)
            else:
                update = weights.delta(params, patch.weight(target, module).shape)
                if multiplier != 0:
                    patch.add(target, module, update * multiplier)
        except weights.UnsupportedModule as err:
            outcome.unsupported.add(str(err))
            continue
        except ValueError:
            outcome.misfit += 1
            continue
        outcome.applied += 1
    return outcome


def _report(name: str, outcome: Outcome, context: api.JobContext) -> None:
    if outcome.unsupported:
        context.warn(f"LoRA {name!r}: unsupported layer types skipped: {', '.join(sorted(outcome.unsupported))}")
    skipped = outcome.missing + outcome.misfit
    if outcome.applied == 0 and outcome.total:
        context.warn(f"LoRA {name!r} does not fit this model ({outcome.total} layers, none match: "
                     f"made for another architecture?); ignored")
    elif skipped:
        context.warn(f"LoRA {name!r}: {skipped} of {outcome.total} layers do not fit this model and were skipped")


def apply_tags(patch: api.ModelPatch, tags: list[api.ExtraNetworkTag], library: LoraLibrary,
               context: api.JobContext) -> None:
    """Every LoRA tag of the job: load (cached), add its deltas, and record `Lora hashes`."""
    index: dict[str, dict[str, str]] | None = None
    missing, hashes = [], []
    for tag in tags:
        try:
            request = parse_tag(tag)
        except ValueError as err:
            context.warn(f"Bad LoRA tag <{tag.name}:{':'.join(tag.args)}>: {err}; ignored")
            continue
        lora = library.find(request.name)
        if lora is None:
            missing.append(request.name)
            continue
        try:
            tensors = library.tensors(lora)
        except LoraFileError as err:
            raise api.InvalidParams(f"LoRA {request.name!r} cannot be used: {err}") from None
        made_for, (group, model_name) = lora_architecture(tensors), model_architecture(patch)
        if made_for is not None and made_for != group:
            context.warn(f"LoRA {request.name!r} is made for {made_for} and the loaded model is {model_name}; "
                         f"ignored. Use it with a {made_for} checkpoint.")
            continue
        index = index if index is not None else module_index(patch)
        outcome = add_lora(patch, index, tensors, request)
        _report(request.name, outcome, context)
        if outcome.applied:
            hashes.append(f"{request.name.replace(':', '').replace(',', '')}: {lora.shorthash}")
    if missing:
        context.warn(f"Networks not found: {', '.join(missing)}")
    if hashes:
        context.infotext["Lora hashes"] = ", ".join(hashes)
