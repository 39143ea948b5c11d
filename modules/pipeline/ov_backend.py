"""`--compile --compile-backend openvino`: the UNet, VAE decoder and CLIP text encoders run through OpenVINO.

- Each module is converted from the loaded torch module (`openvino.convert_model`, traced with the
  first call's inputs; shapes stay dynamic), saved as IR under DATA_DIR/cache/openvino, and compiled
  for the CPU with bf16 inference precision when the engine runs bf16 and the CPU has bf16 units.
- **The cache key is the weights' content**: a digest over per-tensor digests. The per-tensor digests
  of a checkpoint are computed once and kept beside the IR, named by the checkpoint's (and VAE's)
  hash and dtype, so a later load reads them instead of hashing the weights again.
- **LoRA and other in-place weight patches invalidate the key**: every call compares the tensors'
  version counters with the load's. Changed tensors are hashed again; the key covers the patched
  content, so a patch set gets its own IR (converted once, then read from disk), and after a
  restore the tensors hash as the original and the base model runs again.
- A call the graph cannot express runs the module's own forward: unknown keyword arguments
  (ControlNet residuals), hooks on submodules (textual inversion, memory policies), swapped attention
  processors or changed conv padding (seamless tiling).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.errors import AtelierError
from modules.pipeline.weight_watch import WeightWatch, digests_name, module_structure

log = logging.getLogger(__name__)
FORMAT = "ov2"  # bump when the traced graphs change, so old IR is not reused
KEEP_COMPILED = 2  # compiled models kept per module: the base and the last patch set


class OpenVinoUnavailable(AtelierError):
    """--compile-backend openvino without the openvino package."""


def require_openvino():
    try:
        import openvino
    except ImportError as err:
        raise OpenVinoUnavailable("--compile-backend openvino needs the OpenVINO runtime: pip install openvino "
                                  "(or pip install 'atelier[openvino]'), or start without it.") from err
    return openvino


def precision_hint(dtype: torch.dtype, capabilities: list[str]) -> str:
    """bf16 inference where the engine runs bf16 and the CPU has bf16 units; else f32."""
    return "bf16" if dtype == torch.bfloat16 and "BF16" in capabilities else "f32"


# -- adapters: one module kind's call -> flat tensor inputs, and flat outputs -> its return value ----------

class UNetAdapter:
    """diffusers UNet2DConditionModel called as the denoisers call it (return_dict=False)."""

    kind = "unet"

    @staticmethod
    def inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor] | None:
        kwargs = dict(kwargs)
        names = ("sample", "timestep", "encoder_hidden_states")
        for name, value in zip(names, args, strict=False):
            kwargs[name] = value
        if len(args) > 3 or kwargs.pop("return_dict", True) is not False:
            return None
        added = kwargs.pop("added_cond_kwargs", None) or {}
        flat = {name: kwargs.pop(name, None) for name in names}
        if any(v is not None for v in kwargs.values()) or set(added) - {"text_embeds", "time_ids"}:
            return None
        flat.update(added)
        return flat if all(isinstance(v, torch.Tensor) for v in flat.values()) else None

    @staticmethod
    def forward(module: nn.Module, names: list[str], values: list[torch.Tensor], dtype: torch.dtype):
        kw = dict(zip(names, values, strict=True))
        added = {k: kw.pop(k).to(dtype) for k in ("text_embeds", "time_ids") if k in kw}
        out = type(module).forward(module, kw["sample"].to(dtype), kw["timestep"],
                                   encoder_hidden_states=kw["encoder_hidden_states"].to(dtype),
                                   added_cond_kwargs=added or None, return_dict=False)[0]
        return (out.float(),)

    @staticmethod
    def outputs(outs: list[torch.Tensor], kwargs: dict, dtype: torch.dtype):
        return (outs[0].to(dtype),)


class DecoderAdapter:
    """diffusers' VAE Decoder: `decoder(z)`."""

    kind = "vae_decoder"

    @staticmethod
    def inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor] | None:
        if len(args) != 1 or any(v is not None for v in kwargs.values()) or not isinstance(args[0], torch.Tensor):
            return None
        return {"z": args[0]}

    @staticmethod
    def forward(module: nn.Module, names: list[str], values: list[torch.Tensor], dtype: torch.dtype):
        return (type(module).forward(module, values[0].to(dtype)).float(),)

    @staticmethod
    def outputs(outs: list[torch.Tensor], kwargs: dict, dtype: torch.dtype):
        return outs[0].to(dtype)


class TextAdapter:
    """transformers CLIPTextModel / CLIPTextModelWithProjection: `encoder(input_ids=..., output_hidden_states=...)`.

    The graph always returns every hidden state: [last, pooled, *hidden_states].
    """

    kind = "text"

    @staticmethod
    def inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor] | None:
        kwargs = dict(kwargs)
        ids = args[0] if args else kwargs.pop("input_ids", None)
        kwargs.pop("output_hidden_states", None)
        if len(args) > 1 or any(v is not None for v in kwargs.values()) or not isinstance(ids, torch.Tensor):
            return None
        return {"input_ids": ids}

    @staticmethod
    def forward(module: nn.Module, names: list[str], values: list[torch.Tensor], dtype: torch.dtype):
        out = type(module).forward(module, input_ids=values[0], output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return tuple(t.float() for t in (out.last_hidden_state, pooled, *out.hidden_states))

    @staticmethod
    def outputs(outs: list[torch.Tensor], kwargs: dict, dtype: torch.dtype, projection: bool = False):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        last, pooled, *hidden = (t.to(dtype) for t in outs)
        hidden = tuple(hidden) if kwargs.get("output_hidden_states") else None
        if projection:
            return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class _Traced(nn.Module):
    """The module's own forward over positional tensors, for tracing (bypasses the runner)."""

    def __init__(self, module: nn.Module, adapter, names: list[str], dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.adapter, self.names, self.dtype = module, adapter, names, dtype

    def forward(self, *values: torch.Tensor):
        return self.adapter.forward(self.inner, self.names, list(values), self.dtype)


class OpenVinoRunner:
    """Stands in for one module's `forward`; see the module docstring."""

    def __init__(self, module: nn.Module, adapter, folder: Path, name: str | None, hint: str) -> None:
        self.module, self.adapter, self.folder, self.hint = module, adapter, folder, hint
        self.eager: Callable = module.forward
        self.conversions = 0  # IR conversions done by this runner (the tests count them)
        self.fallbacks: dict[str, int] = {}  # why calls ran the module's own forward: "call" or "structure"
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._watch = self._structure()
        self.weights = WeightWatch(module, folder / f"{name}.digests.json" if name else None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def __call__(self, *args, **kwargs):
        inputs = self.adapter.inputs(args, kwargs)
        why = "call" if inputs is None else "structure" if self._structure() != self._watch else None
        if why is not None:
            self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
            return self.eager(*args, **kwargs)
        names, values = list(inputs), list(inputs.values())
        compiled = self._compiled_for(self.key(names, values), names, values)
        arrays = [v.detach().cpu().contiguous().numpy() if not v.is_floating_point()
                  else v.detach().float().cpu().contiguous().numpy() for v in values]
        result = compiled(arrays)
        outs = [torch.from_numpy(result[i].copy()) for i in range(len(compiled.outputs))]
        extra = {"projection": hasattr(self.module, "text_projection")} if self.adapter is TextAdapter else {}
        return self.adapter.outputs(outs, kwargs, self.dtype, **extra)

    # -- what the graph cannot see ------------------------------------------------------------------
    def _structure(self) -> tuple:
        """Hooks on submodules, attention processors and conv padding modes: any change runs eagerly."""
        return module_structure(self.module)

    def key(self, names: list[str], values: list[torch.Tensor]) -> str:
        signature = "-".join(f"{n}{v.dim()}{'f' if v.is_floating_point() else 'i'}" for n, v in zip(names, values,
                                                                                                     strict=True))
        return f"{self.adapter.kind}-{FORMAT}-{str(self.dtype).removeprefix('torch.')}-{signature}-{self.weights.content_key()}"

    # -- conversion and compilation ------------------------------------------------------------------
    def _compiled_for(self, key: str, names: list[str], values: list[torch.Tensor]):
        """The compiled model for `key`: in memory, else from the cached IR, else converted now."""
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        ov = require_openvino()
        xml = self.folder / key / "model.xml"
        if not xml.is_file():
            self._convert(xml, names, values)
        core = ov.Core()
        compiled = core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": self.hint,
                                                                    "PERFORMANCE_HINT": "LATENCY"})
        self._compiled[key] = compiled
        while len(self._compiled) > KEEP_COMPILED:
            self._compiled.popitem(last=False)
        return compiled

    @contextmanager
    def _as_float32(self) -> Iterator[None]:
        """Trace in fp32: an IR traced from bf16 weights gave NaNs in OpenVINO 2026.4 (even run in f32).
        The bf16 -> fp32 -> bf16 round trip is exact, so the tensors keep their digests; the base state
        follows the new storages for tensors that were unpatched before."""
        dtypes = {name: t.dtype for name, t in self.weights.tensors().items()}
        if all(d == torch.float32 or not d.is_floating_point for d in dtypes.values()):
            yield
            return
        before = self.weights.state()
        self.module.float()
        try:
            yield
        finally:
            for name, t in self.weights.tensors().items():
                if t.dtype != dtypes[name]:
                    t.data = t.data.to(dtypes[name])
            self.weights.keep_base_through(before)

    def _convert(self, xml: Path, names: list[str], values: list[torch.Tensor]) -> None:
        ov = require_openvino()
        log.info("OpenVINO: converting %s (first use of these weights; cached in %s)", self.adapter.kind, xml.parent)
        example = tuple(v.detach().float() if v.is_floating_point() else v.detach() for v in values)
        with torch.no_grad(), self._as_float32():
            model = ov.convert_model(_Traced(self.module, self.adapter, names, torch.float32), example_input=example)
        tmp = xml.parent.with_name(xml.parent.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, tmp / xml.name, compress_to_fp16=self.dtype != torch.float32)  # bf16 values fit fp16 exactly
        tmp.rename(xml.parent)  # a crash mid-save leaves no half-written IR under the real key
        self.conversions += 1


ADAPTERS = {"unet": UNetAdapter, "vae_decoder": DecoderAdapter, "text": TextAdapter}


def runner_of(module: nn.Module) -> OpenVinoRunner | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, OpenVinoRunner) else None


def use_openvino(module: nn.Module, kind: str, folder: Path, name: str | None, dtype: torch.dtype) -> OpenVinoRunner:
    """Route `module`'s forward through OpenVINO (in place; `del module.forward` undoes it)."""
    ov = require_openvino()
    hint = precision_hint(dtype, ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    runner = OpenVinoRunner(module, ADAPTERS[kind], folder, name, hint)
    module.forward = runner
    return runner


def openvino_model(model, folder: Path) -> None:
    """Route an SD1 / SD2 / SDXL model's UNet, VAE decoder and CLIP text encoders through OpenVINO."""
    require_openvino()
    if getattr(model.spec, "family", None) is not None or model.weight_dtype not in ("", "bf16", "fp16", "fp32"):
        log.warning("OpenVINO: only SD1 / SD2 / SDXL with plain weights are converted; %s runs eagerly",
                    model.info.name)
        return
    use_openvino(model.unet, "unet", folder, digests_name(model, "unet", model.unet), model.dtype)
    decoder = model.vae.decoder
    use_openvino(decoder, "vae_decoder", folder, digests_name(model, "vae_decoder", decoder),
                 next(model.vae.parameters()).dtype)
    for i, encoder in enumerate(model.text_encoders):
        use_openvino(encoder, "text", folder, digests_name(model, f"te{i}", encoder), next(encoder.parameters()).dtype)
