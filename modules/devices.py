"""Device, dtype and attention backend. Nothing runs at import time."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from modules.errors import InvalidParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype  # UNet and text encoders
    vae_dtype: torch.dtype
    attention: str  # "xformers" or "sdpa"


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParams(f"--device {requested}: CUDA is not available on this machine")
    return device


def choose_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    if device.type == "cpu":
        if precision == "fp16":
            raise InvalidParams("fp16 is not supported on the CPU (it runs about 200x slower there); "
                                "use --precision bf16 or fp32")
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def choose_attention(device: torch.device, want_xformers: bool) -> str:
    if want_xformers and device.type == "cuda":
        if xformers_available():
            return "xformers"
        log.warning("--xformers given but xformers is not installed; using PyTorch SDPA")
    return "sdpa"


def device_config(device: str = "auto", precision: str = "auto", xformers: bool = False) -> DeviceConfig:
    dev = choose_device(device)
    dtype = choose_dtype(dev, precision)
    return DeviceConfig(device=dev, dtype=dtype, vae_dtype=dtype, attention=choose_attention(dev, xformers))


def apply_attention(modules: list[torch.nn.Module], backend: str) -> None:
    """Select the attention processor on diffusers models (SDPA is diffusers' default)."""
    if backend != "xformers":
        return
    for module in modules:
        if hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()
