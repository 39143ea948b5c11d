"""Typed job parameters and results. Plain, serialisable data."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams

MIN_SIZE = 64


@dataclass(frozen=True)
class Txt2ImgParams:
    """A txt2img job, with A1111's field names and defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    rng_source: str = "gpu"
    eta_noise_seed_delta: int = 0
    emphasis: str = "Original"
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    save_images: bool = True
    outdir: Path | None = None  # None: Settings.outputs_dir / "txt2img-images"
    max_size: int = 4096

    def validate(self) -> None:
        """Raise InvalidParams naming the first bad field."""
        _check_size("width", self.width, self.max_size)
        _check_size("height", self.height, self.max_size)
        _check_int("steps", self.steps, 1, 1000)
        _check_int("batch_size", self.batch_size, 1, 64)
        _check_int("n_iter", self.n_iter, 1, 10000)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_number("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_number("subseed_strength", self.subseed_strength, 0.0, 1.0)
        for name in ("seed", "subseed"):
            _check_int(name, getattr(self, name), -1, 2**32 - 1)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = getattr(self, name)
            if value not in (0, -1):
                _check_size(name, value, self.max_size)
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidParams("prompt and negative_prompt must be text")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outdir"] = str(self.outdir) if self.outdir else None
        return data


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParams(f"{name} must be between {low} and {high}, got {value}")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidParams(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidParams(f"{name} must be between {low} and {high}, got {value}")


def _check_size(name: str, value: Any, max_size: int) -> None:
    _check_int(name, value, MIN_SIZE, max_size)
    if value % 8:
        raise InvalidParams(f"{name} must be a multiple of 8, got {value} "
                            f"(nearest: {value // 8 * 8} or {value // 8 * 8 + 8})")


@dataclass
class Result:
    """What a job produced: images with their infotexts and seeds."""

    images: list = field(default_factory=list)  # PIL images
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None
