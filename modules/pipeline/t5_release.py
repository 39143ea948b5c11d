"""`--t5-after-encoding free`: T5's weights are dropped once a pass's prompts are encoded (stages.condition)
and when the job ends, and read back from their file (same precision and packing as at load) before T5
next runs.

The module objects stay (the placement's hooks, the job's LoRA patch and the text conditioner hold them);
only their tensors become meta tensors of the same shape. A job reads T5 back before its LoRA patch is
applied, so the patch lands on real weights and is reverted as usual; when a later encoding of the same
job reads T5 back (another batch, a hires prompt), the job's patch adds its T5 deltas again to the fresh,
unpatched weights. Between jobs T5 holds no memory.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modules.checkpoints.manager import release_memory
from modules.errors import CheckpointError


def is_freed(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _tensors_of(module: nn.Module) -> list[tuple[nn.Module, dict, str]]:
    return [(m, table, name) for m in module.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None]


def release(module: nn.Module) -> None:
    """Every parameter and buffer becomes a meta tensor of its shape and dtype (tied weights stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        for _m, table, name in _tensors_of(module):
            t = table[name]
            if id(t) not in memo:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
            table[name] = memo[id(t)]


def _layout(module: nn.Module) -> list[tuple[str, type, tuple, torch.dtype]]:
    return [(f"{type(m).__name__}.{name}", type(t), tuple(t.shape), t.dtype) for m, table, name in _tensors_of(module)
            for t in [table[name]]]


def refill(module: nn.Module, fresh: nn.Module) -> bool:
    """Put `fresh`'s tensors into `module` (the same network built again); False when their layouts differ."""
    if _layout(module) != _layout(fresh):
        return False
    for (_m, table, name), (_f, fresh_table, _n) in zip(_tensors_of(module), _tensors_of(fresh), strict=True):
        table[name] = fresh_table[name]
    return True


class T5Release:
    """Frees one model's T5 after encoding and reads it back (a forward pre-hook) before it runs again.

    `reload(device)` builds T5 again from its file; `forget()` tells the memory placement that T5's
    weights left the device; `device()` is where reloaded weights go; `model.active_patch` is the
    running job's ModelPatch (set by the plugins layer), whose T5 deltas are added again after a reload.
    """

    def __init__(self, model: Any, t5: nn.Module, reload: Callable[[torch.device], nn.Module],
                 device: Callable[[], torch.device], forget: Callable[[], None]) -> None:
        self.model, self.t5 = model, t5
        self._reload, self._device, self._forget = reload, device, forget
        self.reloads = 0
        self._handles = [t5.register_forward_pre_hook(lambda *_a: self.ensure_loaded(), prepend=True)]

    def free(self) -> None:
        if not is_freed(self.t5):
            self._forget()
            release(self.t5)
            release_memory()  # glibc keeps freed heap pages otherwise (measured: docs/flux-sd3.md)

    def ensure_loaded(self) -> None:
        """Read T5 back if it was freed; CheckpointError (naming the file) when that is not possible."""
        if not is_freed(self.t5):
            return
        with torch.inference_mode(False), torch.no_grad():
            fresh = self._reload(self._device())
            if not refill(self.t5, fresh):
                raise CheckpointError(f"The T5 text encoder {getattr(self.model.t5_source, 'path', '')} changed "
                                      f"since the model was loaded (another network): load the model again")
            self.reloads += 1
            patch = getattr(self.model, "active_patch", None)
            if patch is not None:
                patch.reapply(self.t5)

    def detach(self, reload: bool) -> None:
        """Remove the hooks; with `reload`, T5 is read back first (the policy no longer frees it), and when
        that fails (CheckpointError) the hooks stay, so the next job names the file again."""
        if reload:
            self.ensure_loaded()
        for handle in self._handles:
            handle.remove()
        self._handles = []
