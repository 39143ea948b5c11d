"""k-diffusion's `sampling.py` (PyPI `k-diffusion`, installed --no-deps) as a test reference.

Its package `__init__` imports torchvision, clean-fid and friends, and `sampling.py` imports
`utils` only for `append_dims`; so the module is loaded from the installed file under a bare
parent package, with `k_diffusion.utils` given that one function (the reference's own body:
index with trailing Nones), leaving every sampler's code as published.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_sampling() -> types.ModuleType:
    """The reference `k_diffusion.sampling` module (loaded once per process)."""
    name = "_kdiffusion_reference"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: run tools/setup_venv.sh test")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims
    sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    module_spec = importlib.util.spec_from_file_location(f"{name}.sampling", root / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"{name}.sampling"] = module
    module_spec.loader.exec_module(module)
    return module
