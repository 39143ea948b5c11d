"""Weights on the device under a memory policy (modules/pipeline/memory_policy.py): what fits stays,
the rest moves per component or per block when it runs.

A model is a set of named components (each text encoder, the UNet or transformer, the VAE). Each is
split into units, moved as one piece: the items of its ModuleLists (UNet down / up blocks, FLUX
double and single blocks, SD3 joint blocks, T5 and CLIP layers, VAE up / down blocks) and the
other leaves that hold weights (embedders, norms, output layers). Modules whose weights share
storage (T5's `shared` and `encoder.embed_tokens`) form one unit.

Placement is driven by forward pre-hooks, so the run loop needs no calls of its own: whatever runs
a component (text encoding, sampling, decode, encode) brings it to the device first, and each unit
that is not resident is streamed in before it runs (the previous streamed unit goes back first).
The device therefore never holds more weights than the budget, or than the largest unit when the
budget is smaller than that. Moves go through `mover`, and the free-memory query is injected, so
the decisions are tested on a CPU with a recorder.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modules.pipeline.memory_policy import MemoryPolicy

Mover = Callable[[nn.Module, torch.device], None]
FreeMemory = Callable[[torch.device], "int | None"]


def move_module(module: nn.Module, device: torch.device) -> None:
    module.to(device)


def cuda_free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, counting what torch's caching allocator holds but does not use
    (None elsewhere: the budget is then gpu_weights or unlimited)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(torch.cuda.mem_get_info(device)[0] + cached)


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _storage_keys(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"} - {0}


def _holds_list(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def split_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) units in registration order: ModuleList items whole, other weight-holding leaves whole;
    a child that holds ModuleLists (and no weights of its own) is split further."""
    out: list[tuple[str, nn.Module]] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                out.extend((f"{path}.{i}", item) for i, item in enumerate(child))
            elif _holds_list(child) and not _own_tensors(child):
                walk(child, f"{path}.")
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.append((path, child))

    walk(module, "")
    return out


@dataclass(eq=False)
class Unit:
    name: str
    modules: list[nn.Module]  # usually one; modules whose weights share storage move together
    nbytes: int
    component: Component
    on_device: bool = False
    keys: set[int] = field(default_factory=set)  # storage addresses, to group shared weights


@dataclass(eq=False)
class Component:
    name: str
    module: nn.Module
    entries: list[nn.Module]  # their pre-hooks bring the component to the device and move its inputs
    units: list[Unit] = field(default_factory=list)
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.on_device)


def _add_block(comp: Component, name: str, block: nn.Module, seen: set[int]) -> None:
    """A block becomes a unit, or joins the unit whose weights it shares (T5's shared embedding)."""
    tensors = [t for t in _tensors(block) if id(t) not in seen]
    if not tensors:
        return  # the same module reached twice
    seen.update(id(t) for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    keys = _storage_keys(tensors)
    owner = next((u for u in comp.units if u.keys & keys), None)
    if owner is None:
        comp.units.append(Unit(f"{comp.name}.{name}", [block], nbytes, comp, keys=keys))
    else:
        owner.modules.append(block)
        owner.nbytes += nbytes
        owner.keys |= keys


def build_component(name: str, module: nn.Module, entries: list[nn.Module]) -> Component:
    """The component and its units (one unit when the module cannot be split cleanly)."""
    comp = Component(name, module, entries)
    seen: set[int] = set()
    for block_name, block in (split_blocks(module) if not _own_tensors(module) else []):
        _add_block(comp, block_name, block, seen)
    total = sum(t.numel() * t.element_size() for t in _tensors(module))
    if not comp.units or comp.nbytes != total:  # not split cleanly: one unit
        comp.units = [Unit(name, [module], total, comp)]
    return comp


class Placement:
    """Keeps the weights on `compute` that the policy allows; moves the rest on demand."""

    def __init__(self, policy: MemoryPolicy, compute: torch.device, offload: torch.device | None = None,
                 mover: Mover = move_module, move_inputs: bool = True, free_memory: FreeMemory = cuda_free_memory,
                 always: bool = False) -> None:
        self.policy = policy
        self.compute = torch.device(compute)
        self.offload = torch.device(offload) if offload is not None else torch.device("cpu")
        self.mover = mover
        self.move_inputs = move_inputs  # tests on a CPU record moves but keep the tensors where they are
        self.free_memory = free_memory
        self.always = always  # manage even when compute is the offload device (tests: real CPU-to-CPU moves)
        self.components: dict[str, Component] = {}
        self.budget: float = math.inf
        self.active: Component | None = None
        self.denoiser = "unet"  # the component that runs every step (the UNet or the transformer)
        self.streaming: Unit | None = None
        self.peak_bytes = 0
        self._clock = 0
        self._handles: list = []

    @property
    def enabled(self) -> bool:
        return self.policy.manages and (self.always or self.compute != self.offload)

    def load_device(self) -> torch.device:
        """Where a checkpoint should be built: the CPU when parts are moved on demand."""
        return self.offload if self.enabled else self.compute

    # -- attach / detach ----------------------------------------------------------
    def attach(self, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module],
               names: list[str] | None = None, unet_name: str = "unet") -> None:
        """Park every component on the offload device, fix the budget and hook them."""
        self.detach()
        if not self.enabled:
            return
        names = names or [f"text_encoder_{i}" if i else "text_encoder" for i in range(len(text_encoders))]
        self.denoiser = unet_name
        parts = [*zip(names, text_encoders, strict=True), (unet_name, unet), ("vae", vae)]
        for name, module in parts:
            entries = [c for c in module.children() if any(True for _ in c.parameters())] if module is vae else [module]
            comp = build_component(name, module, entries)
            self.components[name] = comp
            for unit in comp.units:
                for part in unit.modules:
                    self.mover(part, self.offload)
            self._hook_component(comp)
        free = self.free_memory(self.compute)
        self.budget = self.policy.budget(free)

    def _hook_component(self, comp: Component) -> None:
        for entry in comp.entries:
            self._handles.append(entry.register_forward_pre_hook(self._entry_hook(comp), with_kwargs=True))
        if comp.name == "t5xxl" and self.policy.t5_after_encoding == "cpu":
            self._handles.append(comp.module.register_forward_hook(lambda *_a: self.evict(comp)))
        if len(comp.units) > 1:
            for unit in comp.units:
                for module in unit.modules:
                    self._handles.append(module.register_forward_pre_hook(lambda _m, _a, u=unit: self.use_unit(u)))

    def _entry_hook(self, comp: Component):
        def hook(_module, args, kwargs):
            self.use(comp.name)
            if not self.move_inputs:
                return None
            move = lambda v: v.to(self.compute) if isinstance(v, torch.Tensor) else v  # noqa: E731
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.components = [], {}
        self.active = self.streaming = None
        self.peak_bytes = 0

    # -- decisions ------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return sum(c.resident_bytes for c in self.components.values())

    def _move(self, unit: Unit, on_device: bool) -> None:
        if unit.on_device == on_device:
            return
        for module in unit.modules:
            self.mover(module, self.compute if on_device else self.offload)
        unit.on_device = on_device
        if self.streaming is unit and not on_device:
            self.streaming = None
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes())

    def evict(self, comp: Component) -> None:
        for unit in comp.units:
            self._move(unit, False)
        if self.active is comp:
            self.active = None

    def forget(self, name: str) -> None:
        """Component `name`'s weights were dropped (a freed T5): none of its units is on the device now."""
        comp = self.components.get(name)
        for unit in comp.units if comp is not None else []:
            unit.on_device = False
        if self.streaming is not None and self.streaming.component is comp:
            self.streaming = None
        if comp is not None and self.active is comp:
            self.active = None

    def use(self, name: str) -> None:
        """Bring component `name` to the device: whole when the budget allows, else its first blocks."""
        comp = self.components[name]
        self._clock += 1
        comp.last_used = self._clock
        if comp is self.active:
            return
        if self.streaming is not None and self.streaming.component is not comp:
            self._move(self.streaming, False)
        for other in self._to_evict(comp):
            self.evict(other)
        self._shrink_denoiser(comp)
        self._plan(comp, self._room(comp))
        self.active = comp

    def _room(self, comp: Component) -> float:
        return self.budget - (self.resident_bytes() - comp.resident_bytes)

    def _to_evict(self, comp: Component) -> list[Component]:
        """low: every other component. normal: the least recently used first, only until `comp` fits,
        never the denoiser (see `_shrink_denoiser`)."""
        others = sorted((c for c in self.components.values() if c is not comp and c.resident_bytes),
                        key=lambda c: c.last_used)
        if self.policy.mode == "low":
            return others
        chosen: list[Component] = []
        room = self._room(comp)
        for other in others:
            if comp.nbytes <= room:
                break
            if other.name != self.denoiser or comp.name == self.denoiser:
                chosen.append(other)
                room += other.resident_bytes
        return chosen

    def _shrink_denoiser(self, comp: Component) -> None:
        """normal: a component that runs once per job (a text encoder, the VAE) streams through the room
        beside the UNet / transformer; only when that room is smaller than its largest block do the
        denoiser's last resident blocks go back, and only as many as it takes. Each byte moved out comes
        back once, as each byte streamed moves once: the fewest bytes move either way."""
        denoiser = self.components.get(self.denoiser)
        if self.policy.mode != "normal" or denoiser is None or denoiser is comp:
            return
        largest = max(u.nbytes for u in comp.units)
        for unit in reversed(denoiser.units):
            if self._room(comp) >= largest:
                return
            self._move(unit, False)


    def _plan(self, comp: Component, available: float) -> None:
        """Keep the longest prefix of units that fits with room left for the largest streamed one."""
        sizes = [u.nbytes for u in comp.units]
        keep = len(sizes)
        while keep > 0 and sum(sizes[:keep]) + max(sizes[keep:], default=0) > available:
            keep -= 1
        for unit in comp.units[keep:]:
            self._move(unit, False)
        for unit in comp.units[:keep]:
            self._move(unit, True)

    def use_unit(self, unit: Unit) -> None:
        """A unit that is not resident comes in; the previously streamed one goes back first."""
        if unit.component is not self.active:
            self.use(unit.component.name)
        if unit.on_device:
            return
        if self.streaming is not None:
            self._move(self.streaming, False)
        self._move(unit, True)
        self.streaming = unit

    # -- reports --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The policy, the budget and what is resident, for /sdapi/v1/memory."""
        comps = {}
        for name, comp in self.components.items():
            on = [u for u in comp.units if u.on_device]
            comps[name] = {"bytes": comp.nbytes, "resident_bytes": comp.resident_bytes, "units": len(comp.units),
                           "resident_units": len(on), "streaming": self.streaming is not None
                           and self.streaming.component is comp}
        return {**self.policy.describe(), "enabled": self.enabled, "device": str(self.compute),
                "offload_device": str(self.offload),
                "budget_bytes": None if not self.enabled or math.isinf(self.budget) else int(self.budget),
                "resident_bytes": self.resident_bytes(), "peak_resident_bytes": self.peak_bytes,
                "components": comps}

    def units(self) -> Iterator[Unit]:
        for comp in self.components.values():
            yield from comp.units

