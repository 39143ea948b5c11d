"""`--compile`: the denoiser (UNet or transformer) and the VAE decoder through torch.compile (inductor).

- The modules are compiled in place (`nn.Module.compile`), so every caller, hook and patch keeps
  the same objects. Compilation happens at the first call of each shape, not at load.
- Weights stay graph inputs (inductor's `freezing` is off), so LoRA and other in-place weight
  patches are seen at once and never need a recompile.
- `--compile-freeze` turns inductor's `freezing` on instead: the weights become constants, which
  lets oneDNN prepack them (faster on the CPU), at the cost of a second copy of the weights. A frozen
  graph is valid only for the weights it was compiled with, so a call whose weights were patched
  since the load (a LoRA) runs eagerly; once the patch is reverted, the frozen graph runs again.
  The padded attention heads of bf16 on the CPU (sampling/padded_heads.py) are folded in as well.
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
from modules.pipeline.weight_watch import WeightWatch, digests_name, module_structure

COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")


class CompileUnavailable(AtelierError):
    """--compile cannot work on this machine."""


def check_compiler(device: torch.device, backend: str = "inductor", freeze: bool = False,
                   moves_weights: bool = False) -> None:
    """Refuse early, naming the fix: an unknown backend, freezing outside inductor or under a memory policy
    that moves weights, or inductor on the CPU without a C++ compiler."""
    if freeze and backend != "inductor":
        raise CompileUnavailable(f"--compile-freeze is inductor's freezing; it cannot combine with "
                                 f"--compile-backend {backend}. Drop one of the two.")
    if freeze and moves_weights:
        raise CompileUnavailable("--compile-freeze keeps its own copy of the weights on the device, so it cannot "
                                 "combine with a memory policy that moves them (--memory-policy normal/low, "
                                 "--medvram, --lowvram, --offload). Drop one of the two.")
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
                  backend: str = "inductor", freeze: bool = False) -> None:
    """Compile `model.unet` and `model.vae.decoder` in place (first call per shape compiles).

    `openvino` converts them and the text encoders instead, cached in the `openvino` folder beside `cache_dir`.
    `freeze` compiles with inductor's freezing; the load's weight digests are kept in the `frozen` folder.
    """
    check_compiler(device, backend, freeze)
    if backend == "openvino":
        from modules.pipeline.ov_backend import openvino_model

        openvino_model(model, cache_dir.parent / "openvino")
        return
    use_cache_dir(cache_dir)
    if freeze:
        torch._dynamo.reset()  # frozen graphs of models loaded before hold their own copies of the weights
    decoder = getattr(model.vae, "decoder", None)
    parts = {"unet": model.unet, "vae_decoder": decoder if isinstance(decoder, torch.nn.Module) else None}
    for part, module in parts.items():
        if module is None:
            continue
        if freeze:
            name = digests_name(model, part, module)  # None (a diffusers folder): hashed at each load
            freeze_module(module, mode, cache_dir.parent / "frozen" / f"{name}.digests.json" if name else None)
        else:
            compile_module(module, mode, backend)


def compile_module(module: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> None:
    """`module.compile` in place; inductor's modes apply only to inductor."""
    if backend == "inductor":
        module.compile(mode=mode)
    else:
        module.compile(backend=backend)


class FrozenCall:
    """A module's call through inductor with `freezing`, while its weights hold the load's content."""

    def __init__(self, module: torch.nn.Module, mode: str, digests: Path | None) -> None:
        import torch._inductor.config  # noqa: F401 (patched in __call__)

        self.module = module
        self.eager = module._call_impl
        self.weights = WeightWatch(module, digests)
        self.structure = module_structure(module)
        self.signature: tuple | None = None  # the keyword inputs of the first frozen call
        self.compiled = torch.compile(self.eager, mode=mode)
        self.eager_calls = 0  # calls that ran eagerly (the tests count them)

    def __call__(self, *args, **kwargs):
        if not self._frozen_fits(args, kwargs):
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        # dynamo reads `freezing` while tracing (weights as constants, not inputs), outside torch.compile's
        # `options`; patched here, it reaches the compiles this call may start and nothing else
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)

    def _frozen_fits(self, args: tuple, kwargs: dict) -> bool:
        """The frozen graph serves calls with the load's weights and the first frozen call's structure:
        ControlNet residuals, new hooks or processors would each compile another graph with another copy
        of the weights, so those calls run eagerly. Calls with autograd on do too."""
        if torch.is_grad_enabled() or module_structure(self.module) != self.structure:
            return False
        signature = (len(args), tuple(sorted(k for k, v in kwargs.items() if v is not None)))
        self.signature = self.signature or signature
        return signature == self.signature and self.weights.unchanged()


def freeze_module(module: torch.nn.Module, mode: str = "default", digests: Path | None = None) -> FrozenCall:
    """Compile `module` in place with frozen weights (see the module docstring)."""
    call = FrozenCall(module, mode, digests)
    module._compiled_call_impl = call  # what nn.Module.compile sets; module(...) now goes through `call`
    return call


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
