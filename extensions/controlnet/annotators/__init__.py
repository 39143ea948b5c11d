"""Weight-based preprocessors ("annotators"): their files live in models/annotators.

Each annotator module offers `build(path) -> runner`, where the runner maps
`(rgb uint8 HxWx3, resolution, a, b, seed) -> uint8 HxWx3`. `Annotators` finds the file,
builds the runner once and keeps the last few built, so a job or a preview does not
reread weights. A file may be listed under several names ("a.pth|b.pth"): the first present is used. Files are read as safetensors or with `torch.load(weights_only=True)`.
A builder that takes a `device` keyword gets the device the annotators run on (`annotator_device`:
the app's CUDA device when it runs on CUDA, else the CPU); the others run on the CPU.
"""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from modules.plugins import api

Runner = Callable[..., np.ndarray]
Builder = Callable[[Path], Runner]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an annotator file; a pickle that needs code is refused with the file named."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle asking to run code
        raise api.InvalidParams(f"Annotator file {path} could not be read as weights ({type(err).__name__}); "
                                "download it again from the annotator's release page") from None
    for key in ("state_dict", "model", "params"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping):
        raise api.InvalidParams(f"Annotator file {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def annotator_device(requested: str = "cpu") -> torch.device:
    """The device for annotators of an app started with `--device requested`: CUDA where the app
    runs on CUDA and CUDA is present, else the CPU."""
    if requested == "auto":
        requested = "cuda"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        return torch.device("cpu")
    return device if device.type == "cuda" and torch.cuda.is_available() else torch.device("cpu")


class Annotators:
    """The annotator folder of one app, with the runners built from it (the last `keep`)."""

    def __init__(self, folder: Path, keep: int = 2, device: torch.device | None = None) -> None:
        self.dir = folder
        self.keep = keep
        self.device = device or torch.device("cpu")
        self._built: OrderedDict[tuple[str, str, float], Runner] = OrderedDict()
        self._lock = threading.Lock()

    def runner(self, name: str, file: str, build: Builder | None) -> Runner:
        names = file.split("|")
        path = next((self.dir / n for n in names if (self.dir / n).is_file()), self.dir / names[0])
        if build is None or not path.is_file():
            raise api.InvalidParams(f"Preprocessor {name!r} needs the weights file {path}; download "
                                    f"{' or '.join(names)} into {self.dir}, or pick an algorithmic preprocessor "
                                    "(canny, scribble_xdog, tile_resample, ...)")
        key = (name, str(path), path.stat().st_mtime)  # per name: variants of one file differ in their runners
        with self._lock:
            if key not in self._built:
                self._built[key] = _build(name, path, build, self.device)
                while len(self._built) > self.keep:
                    self._built.popitem(last=False)
            self._built.move_to_end(key)
            return self._built[key]


def _build(name: str, path: Path, build: Builder, device: torch.device) -> Runner:
    try:
        if "device" in inspect.signature(build).parameters:
            return build(path, device=device)  # type: ignore[call-arg]
        return build(path)
    except api.InvalidParams:
        raise
    except (KeyError, RuntimeError, ValueError) as err:  # missing keys, wrong shapes
        raise api.InvalidParams(f"Annotator file {path} does not fit preprocessor {name!r} "
                                f"({type(err).__name__}: {str(err)[:200]}); check that it is {path.name} "
                                "from the annotator's release") from None
