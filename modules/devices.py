"""Device, dtype and attention backend. Nothing runs at import time."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.errors import InvalidParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype  # UNet and text encoders
    vae_dtype: torch.dtype
    attention: str  # "xformers" or "sdpa"
    channels_last: bool = False  # VAE convolution weights in NHWC (bf16 on the CPU: decodes ~2x faster)
    pad_attention_heads: bool = False  # self-attention heads zero-padded to 16 dims (bf16 on the CPU: SDPA faster)

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        heads = " (heads padded to 16)" if self.pad_attention_heads else ""
        return (f"{self.device}, UNet/text {str(self.dtype).removeprefix('torch.')}, "
                f"VAE {str(self.vae_dtype).removeprefix('torch.')}, attention {self.attention}{heads}{layout}")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags (Linux /proc/cpuinfo); empty where that file is missing."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16(flags: set[str]) -> bool:
    """bf16 matmuls run in hardware (avx512_bf16 or AMX): about 2x the fp32 throughput."""
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParams(f"--device {requested}: CUDA is not available on this machine")
    return device


def choose_dtype(device: torch.device, precision: str = "auto", fast_bf16: bool = False) -> torch.dtype:
    """The compute dtype. On the CPU, `auto` is bf16 where the CPU has bf16 hardware (`fast_bf16`), else fp32."""
    if device.type == "cpu":
        if precision == "fp16":
            raise InvalidParams("fp16 is not supported on the CPU (it runs about 200x slower there); "
                                "use --precision bf16 or fp32")
        if precision == "auto":
            return torch.bfloat16 if fast_bf16 else torch.float32
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


def device_config(device: str = "auto", precision: str = "auto", xformers: bool = False,
                  flags: set[str] | None = None) -> DeviceConfig:
    """Pick device, dtypes, attention and memory layout. `flags`: CPU flags (read from /proc/cpuinfo if None).

    On the CPU, bf16 (explicit, or `auto` on a CPU with bf16 hardware) also runs the VAE in bf16 with
    channels_last weights (the UNet stays contiguous: NHWC measured ~5% slower for it at 512x512) and pads
    the UNet's 40-dim self-attention heads to 48 (sampling/padded_heads.py); the VAE keeps its fp32 retry
    on NaNs. fp32 stays exactly as it was.
    """
    dev = choose_device(device)
    fast_bf16 = False
    if dev.type == "cpu" and precision == "auto":
        fast_bf16 = cpu_has_fast_bf16(cpu_flags() if flags is None else flags)
    dtype = choose_dtype(dev, precision, fast_bf16)
    cpu_bf16 = dev.type == "cpu" and dtype == torch.bfloat16
    return DeviceConfig(device=dev, dtype=dtype, vae_dtype=dtype, attention=choose_attention(dev, xformers),
                        channels_last=cpu_bf16, pad_attention_heads=cpu_bf16)


def apply_memory_format(modules: list[torch.nn.Module], channels_last: bool) -> None:
    """NHWC convolution weights (oneDNN's fast layout for bf16 on the CPU); a no-op when off."""
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)


def apply_attention(modules: list[torch.nn.Module], backend: str) -> None:
    """Select the attention processor on diffusers models (SDPA is diffusers' default)."""
    if backend != "xformers":
        return
    for module in modules:
        if hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()
