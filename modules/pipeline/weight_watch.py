"""Whether a module's weights, and what else a baked graph depends on, are still as they were watched.

Compiled forms that bake the weights in (OpenVINO IR, inductor's frozen graphs) are valid only for
that content. In-place patches (a LoRA's `ModelPatch.apply`) bump a tensor's version counter, and a
moved tensor has another address, so a call compares those first and hashes again only the tensors
that changed. After a patch is reverted the tensors hash as before, and the content key is the base one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def digests_name(model, part: str, module: nn.Module) -> str | None:
    """The name under which a load keeps `module`'s per-tensor digests: the checkpoint's hash (with the
    VAE's for a VAE part) and the module's dtype. None for a diffusers folder, which has no hash."""
    if not model.model_hash:
        return None
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    vae = f"{model.vae_hash or 'own'}-" if part.startswith("vae") else ""
    return f"{model.model_hash}-{vae}{dtype}-{part}"


def _key(digests: dict[str, str]) -> str:
    return hashlib.blake2b(json.dumps(sorted(digests.items())).encode(), digest_size=12).hexdigest()


class WeightWatch:
    """The content key of `module`'s state dict, now and at the start.

    `digests_path` (named by the checkpoint's hash) keeps the start's per-tensor digests, so a later
    load of the same file reads them instead of hashing every weight again.
    """

    def __init__(self, module: nn.Module, digests_path: Path | None = None) -> None:
        self.module = module
        self.base = self._base_digests(digests_path)
        self.base_state = self.state()
        self.base_key = _key(self.base)
        self._last: tuple[tuple, str] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict(keep_vars=True)

    def state(self) -> tuple:
        return tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in self.tensors().items())

    def _base_digests(self, path: Path | None) -> dict[str, str]:
        if path is not None and path.is_file():
            return json.loads(path.read_text())
        digests = {name: tensor_digest(t) for name, t in self.tensors().items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(digests))
        return digests

    def current_digests(self) -> dict[str, str]:
        """Per-tensor digests now: the start's, with every tensor written or moved since hashed again."""
        digests = dict(self.base)
        base = {entry[0]: entry for entry in self.base_state}
        for name, t in self.tensors().items():
            if base.get(name) != (name, t.data_ptr(), t._version, t.dtype):
                digests[name] = tensor_digest(t)
        return digests

    def content_key(self) -> str:
        """A digest of the weights' content now; hashes only when some tensor changed since the last call."""
        state = self.state()
        if self._last is None or self._last[0] != state:
            self._last = (state, self.base_key if state == self.base_state else _key(self.current_digests()))
        return self._last[1]

    def unchanged(self) -> bool:
        return self.content_key() == self.base_key

    def keep_base_through(self, before: tuple) -> None:
        """Tensors unpatched in `before` that were since replaced by an exact copy (a dtype round trip)
        count as the base in their new storage."""
        base = {entry[0]: entry for entry in self.base_state}
        kept = {entry[0] for entry in before if base.get(entry[0]) == entry}
        self.base_state = tuple(e if e[0] in kept else base.get(e[0], e) for e in self.state())


def _foreign(hook: Callable) -> bool:
    """A hook that may change results; transformers' own output-capturing hooks (installed on the first
    forward that asks for hidden states, traced into the graph like the rest) do not."""
    return not getattr(hook, "__module__", "").startswith("transformers.")


def module_structure(module: nn.Module) -> tuple:
    """What a graph traced from `module` fixed beyond its weights: hooks on submodules, attention
    processors and conv padding modes (seamless tiling)."""
    parts = []
    for sub in module.modules():
        hooks = [h for h in (*sub._forward_hooks.values(), *sub._forward_pre_hooks.values()) if _foreign(h)]
        if sub is not module and hooks:
            parts.append(("hook", id(sub), *map(id, hooks)))
        if hasattr(sub, "processor"):
            parts.append(("processor", id(sub.processor)))
        if isinstance(sub, nn.Conv2d):
            parts.append(sub.padding_mode)
    return tuple(parts)
