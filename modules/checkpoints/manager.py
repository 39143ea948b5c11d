"""Hold at most one loaded model (plus, while jobs ask for one, one refiner); switching releases the old
one's memory first."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.checkpoints.load import load_checkpoint
from modules.checkpoints.load_mmdit import ComponentDirs, preflight
from modules.checkpoints.load_unet import preflight_unet
from modules.checkpoints.model import CheckpointInfo, LoadedModel
from modules.checkpoints.quantized import check_weights_file, require_fp8


@dataclass(frozen=True)
class _LoadKey:
    path: Path
    format: str
    device: str
    dtype: torch.dtype
    vae_dtype: torch.dtype | None
    vae_path: Path | None
    yaml_path: Path | None
    force_v: bool
    channels_last_vae: bool
    components: ComponentDirs | None = None
    weights: str = "auto"


def release_memory() -> None:
    """Collect garbage, empty the CUDA cache and give freed heap pages back to the OS (glibc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # musl and others have no malloc_trim
            pass


def _free_modules(model: LoadedModel) -> None:
    """Move every module of `model` to the meta device, so its weights go even if someone still holds it."""
    for module in (model.unet, model.vae, *model.text_encoders):
        module.to(torch.device("meta"))


class ModelManager:
    """Owns the one LoadedModel of a worker. `load` reuses it when path and options are the same.

    After a switch or `unload`, the previous LoadedModel's modules live on the meta device and
    must not be used; callers should fetch `current` (or the return value of `load`) per job.

    A second slot holds the refiner (A1111's `refiner_checkpoint`) while jobs use one: `load_refiner`
    follows the same reuse and release rules for that slot and never touches the current model;
    `drop_refiner` frees it when jobs stop asking for it.
    """

    def __init__(self, hash_cache: Path | None = None) -> None:
        self._hash_cache = hash_cache
        self._current: LoadedModel | None = None
        self._key: _LoadKey | None = None
        self._refiner: LoadedModel | None = None
        self._refiner_key: _LoadKey | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def load(self, info: CheckpointInfo, *, device: torch.device | str, dtype: torch.dtype,
             vae_path: Path | None = None, yaml_path: Path | None = None, force_v: bool = False,
             vae_dtype: torch.dtype | None = None, channels_last_vae: bool = False,
             components: ComponentDirs | None = None, weights: str = "auto") -> LoadedModel:
        """The loaded `info`, loading it (and releasing the previous model first) when needed.
        `weights`: "auto" (as stored), "fp8" or "fp8-sdxl" (float weights kept as fp8; see load_checkpoint)."""
        key = _LoadKey(Path(info.path).resolve(), info.format, str(torch.device(device)), dtype, vae_dtype,
                       Path(vae_path).resolve() if vae_path else None,
                       Path(yaml_path).resolve() if yaml_path else None, force_v, channels_last_vae, components,
                       weights)
        if self._current is not None and key == self._key:
            return self._current
        dirs = components or ComponentDirs()
        check_weights_file(info.path)  # before the old model goes: a bad file keeps it loaded
        if weights != "auto":
            require_fp8(info.name)
        preflight(info.path, vae_path=vae_path, dirs=dirs)
        preflight_unet(info.path, vae_path=vae_path, dirs=dirs)
        if self._current is not None:  # nothing to release before a first load (skips a ~0.2 s gc pass)
            self._release_current()
        model = load_checkpoint(info, device=device, dtype=dtype, vae_path=vae_path, yaml_path=yaml_path,
                                force_v=force_v, hash_cache=self._hash_cache, vae_dtype=vae_dtype,
                                channels_last_vae=channels_last_vae, components=components, weights=weights)
        self._current, self._key = model, key
        return model

    @property
    def vae_path(self) -> Path | None | bool:
        """The current model's separate VAE file (resolved), None for its own; False when unknown (adopted)."""
        return self._key.vae_path if self._key is not None else False

    @property
    def refiner(self) -> LoadedModel | None:
        return self._refiner

    def load_refiner(self, info: CheckpointInfo, *, device: torch.device | str, dtype: torch.dtype,
                     vae_path: Path | None = None, vae_dtype: torch.dtype | None = None,
                     channels_last_vae: bool = False, components: ComponentDirs | None = None) -> LoadedModel:
        """The loaded refiner `info` (the current model itself when it is the same file and options).

        A failed load leaves the current model as it was; the previous refiner is released first."""
        key = _LoadKey(Path(info.path).resolve(), info.format, str(torch.device(device)), dtype, vae_dtype,
                       Path(vae_path).resolve() if vae_path else None, None, False, channels_last_vae, components)
        if self._current is not None and key == self._key:
            return self._current
        if self._refiner is not None and key == self._refiner_key:
            return self._refiner
        preflight(info.path, vae_path=vae_path, dirs=components or ComponentDirs())
        self.drop_refiner()
        model = load_checkpoint(info, device=device, dtype=dtype, vae_path=vae_path, hash_cache=self._hash_cache,
                                vae_dtype=vae_dtype, channels_last_vae=channels_last_vae, components=components)
        self._refiner, self._refiner_key = model, key
        return model

    def drop_refiner(self) -> None:
        """Free the refiner slot (nothing to do when it is empty)."""
        if self._refiner is None:
            return
        _free_modules(self._refiner)
        self._refiner = self._refiner_key = None
        release_memory()

    def _release_current(self) -> None:
        if self._current is not None:
            _free_modules(self._current)
        self._current = self._key = None
        release_memory()

    def adopt(self, model: LoadedModel) -> LoadedModel:
        """Make an already-built model current (benchmarks and tests build modules directly)."""
        self.unload()
        self._current, self._key = model, None
        return model

    def invalidate(self) -> None:
        """The next `load` builds the model again even with the same options (a freed T5's file changed)."""
        self._key = None

    def unload(self) -> None:
        """Drop the current model (and the refiner) and return their memory."""
        if self._refiner is not None:
            _free_modules(self._refiner)
            self._refiner = self._refiner_key = None
        self._release_current()
