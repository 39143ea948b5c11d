"""Upscaler model files in the models folders, named as A1111 names them.

A file's name is its stem ("4x-UltraSharp"), except Real-ESRGAN's release files, which A1111
lists under fixed names ("R-ESRGAN 4x+"); the stem stays an alias. The scale shown before a file
is loaded comes from its name ("4x", "x2"); loading detects the real scale from the weights.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".pth", ".safetensors")
REALESRGAN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
_SCALE = re.compile(r"(?:^|[^a-z0-9])(\d)x|x(\d)(?:$|[^0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class UpscalerFile:
    name: str
    path: Path
    scale: int
    folder: str  # "ESRGAN", "RealESRGAN", ... (A1111's upscaler family folder)

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.path.stem,) if self.path.stem != self.name else ()


def scale_from_name(stem: str, default: int = 4) -> int:
    found = _SCALE.search(stem)
    if not found:
        return default
    return int(found.group(1) or found.group(2)) or default


def find_upscalers(folders: Iterable[Path]) -> list[UpscalerFile]:
    """Model files under `folders` (not recursive into hidden folders), first name wins, sorted by name."""
    found: dict[str, UpscalerFile] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in SUFFIXES or not path.is_file() or any(
                    part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            name = REALESRGAN_NAMES.get(path.stem, path.stem)
            if name.lower() not in found:
                found[name.lower()] = UpscalerFile(name, path, scale_from_name(path.stem), folder.name)
    return sorted(found.values(), key=lambda f: f.name.lower())
