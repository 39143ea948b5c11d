"""Copy-on-write weight patches for one job (LoRA and friends), reverted bit for bit afterwards.

Extensions add deltas in their `patch_model` hook; the engine applies them once before
the job samples and restores the saved originals when it ends (also on errors and
interrupts). Only the patched tensors are copied, so a job without patches costs nothing,
and a job after a patched one sees exactly the weights a fresh load gives.

Deltas are summed in float32 on the weight's device, then added and cast to the weight's
dtype once. Merging into the weights (rather than adding a low-rank branch at forward time)
keeps sampling as fast as without a LoRA; `apply_seconds`/`restore_seconds` measure it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from modules.checkpoints.mmdit_keys import original_layout
from modules.checkpoints.packed import packed_weight

Delta = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


class ModelPatch:
    """The loaded model as one job sees it: named modules per target and pending weight deltas.

    Targets: "unet", and "te0", "te1" for the text encoders in order (SDXL: clip_l, clip_g).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.arch: str = model.spec.arch
        self._targets: dict[str, nn.Module] = {"unet": model.unet}
        self._targets.update({f"te{i}": te for i, te in enumerate(model.text_encoders)})
        self._modules: dict[str, dict[str, nn.Module]] = {}
        self._deltas: dict[tuple[str, str], list[Delta]] = {}
        self._saved: dict[tuple[str, str], torch.Tensor | None] = {}  # None: a packed weight's delta
        self._layout: dict[str, dict[str, torch.Tensor]] | None = None
        self.apply_seconds = 0.0
        self.restore_seconds = 0.0

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    def config(self, target: str) -> Any:
        """The target's config (a diffusers/transformers config object)."""
        return getattr(self._targets[target], "config", None)

    def modules(self, target: str) -> dict[str, nn.Module]:
        """Named submodules of a target ("down_blocks.0.attentions.0.proj_in", ...)."""
        if target not in self._modules:
            self._modules[target] = dict(self._targets[target].named_modules())
        return self._modules[target]

    def original_layout(self, target: str) -> dict[str, dict[str, torch.Tensor]]:
        """FLUX.1 / SD3.5 transformer: original-layout module -> {module: row indices of the original weight}.

        For LoRA files named after the original (BFL / Stability) modules, whose fused weights
        (`qkv`, `linear1`) are split here; empty for other targets and models.
        """
        family = getattr(self.model.spec, "family", None)
        if target != "unet" or family is None:
            return {}
        if self._layout is None:
            modules = self.modules("unet")

            def rows_of(name: str) -> int | None:
                weight = getattr(modules.get(name), "weight", None)
                return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None

            self._layout = original_layout(family.transformer, self.config("unet"), rows_of)
        return self._layout

    def text_encoder_flavours(self) -> list[str]:
        return [spec.flavour for spec in self.model.spec.text_encoders]

    def weight(self, target: str, module: str) -> torch.Tensor:
        return self.modules(target)[module].weight

    def add(self, target: str, module: str, delta: Delta) -> None:
        """Queue `delta` (a tensor of the weight's shape, or `fn(weight) -> delta`) for a module's weight."""
        if target not in self._targets:
            raise KeyError(f"unknown patch target {target!r}; expected one of {self.targets}")
        if module not in self.modules(target):
            raise KeyError(f"{target} has no module {module!r}")
        self._deltas.setdefault((target, module), []).append(delta)

    def __len__(self) -> int:
        return len(self._deltas)

    def apply(self) -> None:
        """Save the originals of the patched weights and add the summed deltas.

        A packed weight (GGUF, fp8) is never written: its summed delta is set on the layer's
        restore step and added each time the weight is unpacked, until `restore` clears it.
        """
        start = time.perf_counter()
        with torch.no_grad():
            for (target, module), deltas in self._deltas.items():
                self._apply_one(target, module, deltas)
        self.apply_seconds = time.perf_counter() - start

    def _apply_one(self, target: str, module: str, deltas: list[Delta]) -> None:
        weight = self.weight(target, module)
        packed = packed_weight(self.modules(target)[module])
        original = weight if packed is not None else weight.detach().clone()
        total = self._summed(deltas, original, weight)
        self._saved[(target, module)] = None if packed is not None else original
        if packed is not None:
            packed.delta = total.to(packed.dtype)
        elif weight.dtype == torch.float32:
            weight.add_(total)  # the same float32 sum as below, without two more copies
        else:
            weight.copy_((original.float() + total).to(weight.dtype))

    def reapply(self, encoder: nn.Module) -> None:
        """A target whose weights were read again from the file (a freed T5) gets this job's deltas again:
        the fresh weights are unpatched, so nothing is added twice; restore puts back their originals."""
        targets = {name for name, m in self._targets.items() if m is encoder}
        with torch.no_grad():
            for (target, module), deltas in self._deltas.items():
                if target in targets:
                    self._apply_one(target, module, deltas)

    @staticmethod
    def _summed(deltas: list[Delta], original: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        total = None
        for delta in deltas:
            value = delta(original) if callable(delta) else delta
            value = value.to(device=weight.device, dtype=torch.float32).reshape(weight.shape)
            total = value if total is None else total + value
        return total

    def restore(self) -> None:
        """Put every saved original back (exact copies: bit-identical to before `apply`)."""
        start = time.perf_counter()
        with torch.no_grad():
            for (target, module), original in self._saved.items():
                if original is None:
                    packed_weight(self.modules(target)[module]).delta = None
                elif not self.weight(target, module).is_meta:  # a freed T5 is read again unpatched
                    self.weight(target, module).copy_(original)
        self._saved.clear()
        self.restore_seconds = time.perf_counter() - start

    @contextmanager
    def applied(self) -> Iterator[ModelPatch]:
        """Apply for the duration of a `with` block; always restore."""
        try:
            self.model.active_patch = self  # a T5 read again mid-job (t5_release.py) gets the deltas again
            self.apply()
            yield self
        finally:
            self.model.active_patch = None
            self.restore()
