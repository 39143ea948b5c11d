"""Input images of a job (init images, mask) as PNG files beside it, so job data stays small and plain."""
from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def store_inputs(root: Path, images: Mapping[str, Any]) -> dict[str, Any]:
    """Write each image atomically under a new folder of `root`; returns the paths by field name."""
    if not images:
        return {}
    folder = Path(root) / f"{time.strftime('%Y%m%d')}-{secrets.token_hex(8)}"
    folder.mkdir(parents=True, exist_ok=True)
    stored: dict[str, Any] = {}
    for name, value in images.items():
        group = list(value) if isinstance(value, (list, tuple)) else [value]
        paths = [_save(image, folder / f"{name}-{n}.png") for n, image in enumerate(group)]
        stored[name] = paths if isinstance(value, (list, tuple)) else paths[0]
    return stored


def _save(image: Any, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return str(path)


def discard_inputs(stored: Mapping[str, Any]) -> None:
    """Remove the folder `store_inputs` made (a job that was refused after its inputs were stored)."""
    for value in stored.values():
        first = value[0] if isinstance(value, list) else value
        shutil.rmtree(Path(first).parent, ignore_errors=True)
        return


def load_inputs(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Stored paths -> PIL images, as the params fields want them (init_images a tuple)."""
    images: dict[str, Any] = {}
    for name, value in stored.items():
        if isinstance(value, list):
            images[name] = tuple(_open(p) for p in value)
        elif isinstance(value, str):
            images[name] = _open(value)
    return images


def _open(path: str):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()
