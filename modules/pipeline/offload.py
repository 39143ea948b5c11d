"""Low-VRAM placement: move the text encoders, UNet and VAE (or the UNet's blocks) to the GPU only while used.

- `normal`: everything stays on the compute device.
- `medvram` (A1111's --medvram): one part at a time on the GPU. Using the UNet sends the text
  encoders and the VAE back to the CPU, and so on. Costs a few transfers per job.
- `lowvram` (A1111's --lowvram): as medvram, but the UNet goes block by block (conv_in, each
  down block, the mid block, each up block, the output layers): only the running block is on
  the GPU. Costs a transfer per block per step.

Placement is driven by forward pre-hooks, so the run loop needs no calls of its own: whatever
runs a part (text encoding, sampling, decode, encode) brings it to the GPU first. Moves go
through `mover`, so the decisions can be tested on a CPU with a recorder.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

VRAM_MODES = ("normal", "medvram", "lowvram")
Mover = Callable[[torch.nn.Module, torch.device], None]


def move_module(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)


def unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's top-level blocks in call order (diffusers names), each moved as one piece in lowvram."""
    blocks: list[torch.nn.Module] = []
    for child in unet.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


class Placement:
    """Keeps at most one part (medvram) or one UNet block (lowvram) of a model on `compute`."""

    def __init__(self, mode: str, compute: torch.device, offload: torch.device | None = None,
                 mover: Mover = move_module, move_inputs: bool = True) -> None:
        if mode not in VRAM_MODES:
            raise ValueError(f"unknown VRAM mode {mode!r}; choose from {VRAM_MODES}")
        self.mode = mode
        self.compute = torch.device(compute)
        self.offload = torch.device(offload) if offload is not None else torch.device("cpu")
        self.mover = mover
        self.move_inputs = move_inputs  # tests on a CPU record moves but keep the tensors where they are
        self.active: str | None = None  # the part on `compute`
        self.active_block: torch.nn.Module | None = None  # lowvram: the UNet block on `compute`
        self._parts: dict[str, list[torch.nn.Module]] = {}
        self._handles: list = []

    @property
    def enabled(self) -> bool:
        return self.mode != "normal" and self.compute != self.offload

    def load_device(self) -> torch.device:
        """Where a checkpoint should be built: the CPU when parts are moved on demand."""
        return self.offload if self.enabled else self.compute

    def attach(self, unet: torch.nn.Module, vae: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> None:
        """Park every part on the offload device and hook them so each comes to `compute` when it runs."""
        self.detach()
        if not self.enabled:
            return
        self._parts = {"text": list(text_encoders), "vae": [vae]}
        if self.mode == "medvram":
            self._parts["unet"] = [unet]
        for part, modules in self._parts.items():
            for module in modules:
                self.mover(module, self.offload)
            hooked = [c for m in modules for c in (m.children() if part == "vae" else [m])]
            for module in hooked:  # the VAE runs through decode()/encode(), not forward: hook its children
                self._hook(module, lambda p=part: self.use(p))
        if self.mode == "lowvram":
            self.mover(unet, self.offload)
            self._hook(unet, lambda: self.use("unet"))
            for block in unet_blocks(unet):
                self._handles.append(block.register_forward_pre_hook(lambda mod, *_a: self.use_block(mod)))
        self.active = self.active_block = None

    def _hook(self, module: torch.nn.Module, before: Callable[[], None]) -> None:
        """Run `before`, then hand the module its tensor arguments on `compute` (callers built them
        on the device the parked module reported)."""
        def hook(_module, args, kwargs):
            before()
            if not self.move_inputs:
                return None
            move = lambda v: v.to(self.compute) if isinstance(v, torch.Tensor) else v  # noqa: E731
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._parts = [], {}
        self.active = self.active_block = None

    def use(self, part: str) -> None:
        """Bring `part` ("text", "unet" or "vae") to `compute`; send the part that was there back."""
        if part == self.active:
            return
        if self.active is not None:
            for module in self._parts.get(self.active, []):
                self.mover(module, self.offload)
            if self.active == "unet" and self.active_block is not None:
                self.mover(self.active_block, self.offload)
                self.active_block = None
        for module in self._parts.get(part, []):
            self.mover(module, self.compute)
        self.active = part

    def use_block(self, block: torch.nn.Module) -> None:
        """lowvram: `block` to `compute`, the previous block back."""
        if block is self.active_block:
            return
        if self.active_block is not None:
            self.mover(self.active_block, self.offload)
        self.mover(block, self.compute)
        self.active_block = block
