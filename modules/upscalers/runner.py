"""Runs model upscalers on PIL images: one cached network, tiles, precision with fallback, progress.

On CUDA a network runs in bf16 (fp16 where bf16 is unsupported); a tile whose output is not
finite is run again in float32, and that network stays in float32 from then on.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.upscalers.load import UpscalerNet, load_upscaler
from modules.upscalers.tiling import auto_tile, upscale_tiled

Progress = Callable[[int, int], None]
MAX_PASSES = 3  # as A1111: a 4x model reaches 8x in two passes, never more than three


@dataclass(frozen=True)
class TileSettings:
    tile: int = 0  # input pixels per tile side; 0 = automatic from free memory
    overlap: int = 0  # 0 = automatic (tile / 16, at least 8)
    device: str = "auto"
    half: bool = True  # bf16/fp16 on CUDA


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div_(255)


def input_channels(net: torch.nn.Module) -> int:
    """Channels the network reads: those of its first convolution (3 when it has none)."""
    first = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB (1, 3, H, W) as the network's input: luma (ITU-R 601, as PIL's "L") for one-channel models."""
    if channels == 1:
        return (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if channels == 4:
        return torch.cat([x, torch.ones_like(x[:, :1])], 1)  # opaque alpha
    return x


def to_rgb(y: torch.Tensor) -> torch.Tensor:
    """The network's output as RGB: grey repeated, alpha dropped."""
    return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y[:, :3]


def to_image(x: torch.Tensor) -> Image.Image:
    array = x[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


class ModelUpscaler:
    """Loads one upscaler network at a time (the last used stays cached) and runs it tiled."""

    def __init__(self, tiles: TileSettings | None = None) -> None:
        self.tiles = tiles or TileSettings()
        self._lock = threading.Lock()
        self._cached: UpscalerNet | None = None
        self._fp32_only: set[Path] = set()

    def _device(self) -> torch.device:
        if self.tiles.device not in ("auto", ""):
            return torch.device(self.tiles.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def network(self, path: Path) -> UpscalerNet:
        path = Path(path)
        if self._cached is None or self._cached.path != path:
            self._cached = None  # free the previous network before reading the next
            self._cached = load_upscaler(path)
        return self._cached

    def _dtype(self, device: torch.device, path: Path) -> torch.dtype:
        if device.type != "cuda" or not self.tiles.half or path in self._fp32_only:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def run_tensor(self, upscaler: UpscalerNet, x: torch.Tensor, on_tile: Progress | None = None) -> torch.Tensor:
        """One pass of the network over (1, 3, H, W) in [0, 1]; float32 on the CPU."""
        device = self._device()
        dtype = self._dtype(device, upscaler.path)
        net = upscaler.net.to(device=device, dtype=dtype)

        def run(tile: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                out = net(tile.to(device=device, dtype=net_dtype[0]))
                if net_dtype[0] != torch.float32 and not torch.isfinite(out).all():
                    self._fp32_only.add(upscaler.path)  # overflow in half precision: float32 from now on
                    net_dtype[0] = torch.float32
                    net.float()
                    out = net(tile.to(device=device, dtype=torch.float32))
                return out.float().cpu()

        net_dtype = [dtype]
        x = fit_channels(x, input_channels(net))
        tile = self.tiles.tile or auto_tile(device, upscaler.scale, 2 if dtype != torch.float32 else 4)
        overlap = self.tiles.overlap or max(8, tile // 16)
        try:
            return to_rgb(upscale_tiled(run, x, upscaler.scale, tile, overlap, on_tile))
        finally:
            net.to("cpu")

    def upscale(self, image: Image.Image, scale: float, path: Path, progress: Progress | None = None
                ) -> Image.Image:
        """`image` enlarged `scale` times with the model at `path`: repeated passes, then Lanczos to size."""
        target = (round(image.width * scale), round(image.height * scale))
        with self._lock:
            upscaler = self.network(path)
            for done in range(MAX_PASSES):
                reached = image.width >= target[0] and image.height >= target[1]
                if reached and (done or scale != 1):  # at scale 1 a model (1x restoration) runs once
                    break
                image = to_image(self.run_tensor(upscaler, to_tensor(image), progress))
                if upscaler.scale == 1:
                    break
        if image.size != target:
            image = image.resize(target, resample=Image.Resampling.LANCZOS)
        return image
