"""`--compile`: the denoiser (UNet or transformer) and the VAE decoder through torch.compile (inductor).

- The modules are compiled in place (`nn.Module.compile`), so every caller, hook and patch keeps
  the same objects. Compilation happens at the first call of each shape, not at load.
- Weights stay graph inputs (inductor's `freezing` is off), so LoRA and other in-place weight
  patches are seen at once and never need a recompile.
- inductor's FX graph and kernel caches live under DATA_DIR/cache/inductor, so a later launch
  reuses what an earlier one compiled.
- On the CPU inductor needs a C++ compiler; without one `--compile` is refused with the fix.
- `--compile-backend` takes any torch.compile backend, such as `aot_eager` to check a problem without
  code generation. `openvino` is not torch.compile's OpenVINO backend (it fails to trace with this torch
  and would bake the weights in as constants): it converts the modules to OpenVINO IR, see ov_backend.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from modules.errors import AtelierError

COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")


class CompileUnavailable(AtelierError):
    """--compile cannot work on this machine."""


def check_compiler(device: torch.device, backend: str = "inductor") -> None:
    """Refuse early, naming the fix: an unknown backend, or inductor on the CPU without a C++ compiler."""
    if backend == "openvino":
        from modules.pipeline.ov_backend import require_openvino

        require_openvino()
        return
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise CompileUnavailable(f"--compile-backend {backend!r} is not a torch.compile backend here; known: "
                                 f"{', '.join(sorted(known))} (openvino appears once `pip install openvino` ran).")
    if device.type != "cpu" or backend != "inductor":
        return
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise CompileUnavailable("--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH. "
                                 "Install one (Debian/Ubuntu: apt install g++) or start without --compile.")


def use_cache_dir(folder: Path) -> None:
    """Point inductor's on-disk caches at `folder` (process-wide, as inductor reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True


def compile_model(model, device: torch.device, cache_dir: Path, mode: str = "default",
                  backend: str = "inductor") -> None:
    """Compile `model.unet` and `model.vae.decoder` in place (first call per shape compiles).

    `openvino` converts them and the text encoders instead, cached in the `openvino` folder beside `cache_dir`.
    """
    check_compiler(device, backend)
    if backend == "openvino":
        from modules.pipeline.ov_backend import openvino_model

        openvino_model(model, cache_dir.parent / "openvino")
        return
    use_cache_dir(cache_dir)
    compile_module(model.unet, mode, backend)
    decoder = getattr(model.vae, "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        compile_module(decoder, mode, backend)


def compile_module(module: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> None:
    """`module.compile` in place; inductor's modes apply only to inductor."""
    if backend == "inductor":
        module.compile(mode=mode)
    else:
        module.compile(backend=backend)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
