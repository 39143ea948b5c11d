"""spandrel as a test reference, where it is installed.

`import spandrel` imports torchvision at module level (for its LaMa and RestoreFormer
architectures only). PyPI's torchvision builds for the pinned torch need CUDA torch, so on
the CPU-only torch here torchvision fails to load its operators. When that happens this helper
gives spandrel placeholder torchvision names for those two architectures, which the tests never
load; the ESRGAN and SRVGG code under comparison is spandrel's own.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest

_NEEDED = ("InterpolationMode", "rotate", "normalize")


def _placeholder_torchvision() -> None:
    root, transforms, functional = (types.ModuleType(n) for n in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
    for name in _NEEDED:
        setattr(functional, name, None)
    root.transforms, transforms.functional = transforms, functional
    sys.modules.update({m.__name__: m for m in (root, transforms, functional)})


def spandrel_or_skip():
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel is not installed (pip install spandrel)")
    try:
        import torchvision  # noqa: F401
        placeholder = False
    except Exception:  # no torchvision, or a CUDA-only build under a CPU torch
        _drop_torchvision()
        _placeholder_torchvision()
        placeholder = True
    import spandrel

    if placeholder:  # spandrel holds what it needs; later imports (diffusers probes find_spec) must not see it
        _drop_torchvision()
    return spandrel


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
