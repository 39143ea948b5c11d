"""The memory policy: a mode and a budget for the weights on the compute device.

Modes (Forge's model-management modes; A1111's flags and diffusers' offload names map onto them):

- `none`:   every weight stays on the compute device (A1111 without flags; diffusers without offload).
- `normal`: each component (every text encoder, the UNet / transformer, the VAE) lives on the CPU and
            comes to the device whole when it runs, and stays while the budget holds it; the least
            recently used component leaves first. A component larger than the budget keeps its first
            blocks resident and streams the others block by block.
- `low`:    only the running component is on the device; its blocks up to the budget stay, the rest stream.

The budget is `gpu_weights` GiB of weights when given (Forge's "GPU Weights" slider), else the
device's free memory when the model is attached minus `keep_free` GiB (the free-memory target,
Forge's inference memory). `math.inf` means no limit.

| flag                  | mode   | budget                                  |
|-----------------------|--------|-----------------------------------------|
| (none)                | none   | -                                       |
| --medvram             | low    | unlimited: one whole component at a time |
| --lowvram             | low    | 0: one block at a time                   |
| --offload none        | none   | -                                       |
| --offload model       | low    | unlimited (diffusers' model offload)     |
| --offload sequential  | low    | 0 (diffusers' sequential offload, per block) |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from modules.errors import InvalidParams

MODES = ("none", "normal", "low")
T5_CHOICES = ("keep", "cpu", "free")  # after encoding: as the policy says, back to the CPU, or freed (t5_release)
GIB = 1024**3
DEFAULT_KEEP_FREE = 2.0  # GiB for activations (FLUX.1-dev at 1024x1024 needs about 1.5 in bf16)
LEGACY = {"normal": ("none", None), "medvram": ("low", math.inf), "lowvram": ("low", 0.0)}
OFFLOAD = {"none": ("none", None), "model": ("low", math.inf), "sequential": ("low", 0.0)}


@dataclass(frozen=True)
class MemoryPolicy:
    mode: str = "none"
    gpu_weights: float | None = None  # GiB of weights on the device; None: from free memory and keep_free
    keep_free: float = DEFAULT_KEEP_FREE  # GiB left free for activations when gpu_weights is None
    t5_after_encoding: str = "keep"

    def __post_init__(self) -> None:
        check_policy(self.mode, self.gpu_weights, self.keep_free, self.t5_after_encoding)

    @property
    def manages(self) -> bool:
        return self.mode != "none"

    def budget(self, free_bytes: int | None) -> float:
        """Bytes of weights allowed on the device, given its free memory (None: unknown -> no limit)."""
        if self.gpu_weights is not None:
            return self.gpu_weights * GIB
        if free_bytes is None:
            return math.inf
        return max(0.0, free_bytes - self.keep_free * GIB)

    def describe(self) -> dict[str, Any]:
        weights = None if self.gpu_weights is None or math.isinf(self.gpu_weights) else self.gpu_weights
        return {"mode": self.mode, "gpu_weights_gib": weights, "unlimited": self.gpu_weights == math.inf,
                "keep_free_gib": self.keep_free, "t5_after_encoding": self.t5_after_encoding}


def _number(name: str, value: Any, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0 or (
            math.isinf(value) and not allow_inf):
        raise InvalidParams(f"{name} must be a number of GiB, 0 or more, got {value!r}", field=name)


def check_policy(mode: Any, gpu_weights: Any, keep_free: Any, t5: Any) -> None:
    """InvalidParams naming the bad field and the choices."""
    if mode not in MODES:
        raise InvalidParams(f"memory policy must be one of {', '.join(MODES)}, got {mode!r}", field="memory_policy")
    if gpu_weights is not None:
        _number("gpu_weights", gpu_weights, allow_inf=True)
    _number("keep_free", keep_free)
    if t5 not in T5_CHOICES:
        raise InvalidParams(f"t5_after_encoding must be one of {', '.join(T5_CHOICES)}, got {t5!r}",
                            field="t5_after_encoding")


def policy_from_settings(settings: Any) -> MemoryPolicy:
    """--memory-policy, else --offload, else A1111's --medvram / --lowvram; --gpu-weights wins over their budget."""
    mode, weights = settings.memory_policy, None
    if mode is None:
        mode, weights = OFFLOAD[settings.offload] if settings.offload else LEGACY[settings.vram]
    if settings.gpu_weights is not None:
        weights = settings.gpu_weights
    return MemoryPolicy(mode, weights, settings.keep_free, settings.t5_after_encoding)


# The server's options (/sdapi/v1/options, the Settings tab) for the policy; gpu_weights -1 = from free memory.
OPTION_KEYS = ("memory_policy", "memory_gpu_weights", "memory_keep_free", "memory_t5_after_encoding")


def policy_options(policy: MemoryPolicy) -> dict[str, Any]:
    weights = -1 if policy.gpu_weights is None else (1e9 if math.isinf(policy.gpu_weights) else policy.gpu_weights)
    return {"memory_policy": policy.mode, "memory_gpu_weights": weights, "memory_keep_free": policy.keep_free,
            "memory_t5_after_encoding": policy.t5_after_encoding}


def policy_from_options(options: dict[str, Any]) -> MemoryPolicy:
    """The policy the options describe; InvalidParams naming the option when one is bad."""
    weights = options.get("memory_gpu_weights", -1)
    if isinstance(weights, int | float) and not isinstance(weights, bool) and weights < 0:
        weights = None
    elif isinstance(weights, int | float) and not isinstance(weights, bool) and weights >= 1e9:
        weights = math.inf
    try:
        return MemoryPolicy(options.get("memory_policy", "none"), weights,
                            options.get("memory_keep_free", DEFAULT_KEEP_FREE),
                            options.get("memory_t5_after_encoding", "keep"))
    except InvalidParams as err:
        names = {"memory_policy": "memory_policy", "gpu_weights": "memory_gpu_weights",
                 "keep_free": "memory_keep_free", "t5_after_encoding": "memory_t5_after_encoding"}
        key = names.get(getattr(err, "field", None) or "", "memory_policy")
        raise InvalidParams(f"{key}: {err}", field=key) from None
