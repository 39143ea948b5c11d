"""Checkpoint files whose weights stay in their stored precision: GGUF, fp8 safetensors, NF4 (detected).

`read_weights(path, dtype)` is `read_state_dict` for every file kind: a `.gguf` file's quantized
tensors and a safetensors file's float8 tensors come back as `PackedTensor`s (fp8 with its
per-tensor `scale_weight` / `weight_scale` folded in), everything else as plain tensors.
`check_weights_file(path)` runs the checks that need no weights - complete file, known quant
types, an architecture that agrees with the file's name and metadata, fp8 support, bitsandbytes
for NF4 - so a bad file is refused before the loaded model is released.
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from modules.checkpoints.flow_arch import FLOW_ARCHES, transformer_prefix
from modules.checkpoints.gguf_file import inspect_gguf, read_gguf
from modules.checkpoints.packed import FP8_DTYPES, PackedTensor, packed_weight
from modules.checkpoints.read import SAFETENSORS_SUFFIXES, _check_safetensors_header, read_state_dict
from modules.errors import CheckpointError

GGUF_SUFFIX = ".gguf"
SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI's scaled fp8; other tools' name
DROPPED_KEYS = ("scaled_fp8", "scale_input", "input_scale")  # markers and fp8-matmul input scales
NF4_MARKER = ".quant_state.bitsandbytes__"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FORMAT_NAMES = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# what a file's name says about its family: (regex on the lowercase name, family)
_NAME_FAMILIES = ((r"flux", "flux"), (r"sd3|sd35|sd_3|stable-diffusion-3", "sd3"),
                  (r"sdxl|sd_xl|xl[-_]base", "sdxl"), (r"sd15|sd1\.5|sd-v1|sd_v1|v1-5", "sd1"))
Weights = dict[str, torch.Tensor | PackedTensor]


def fp8_supported() -> bool:
    """Whether this torch build has the float8 dtypes that fp8 weights are stored in."""
    return all(getattr(torch, name, None) is not None for name in FP8_DTYPES.values())


def require_fp8(what: str) -> None:
    if not fp8_supported():
        raise CheckpointError(f"{what} stores fp8 weights, but this torch ({torch.__version__}) has no float8 "
                              "types. Install torch 2.1 or newer (webui.sh installs one), or use an fp16 or "
                              "GGUF file of the model.")


def require_bitsandbytes(path: Path) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CheckpointError(f"{Path(path).name} is a bitsandbytes NF4 checkpoint, and bitsandbytes is not "
                              "installed. Install the optional extra: pip install bitsandbytes "
                              "(or pip install 'atelier[nf4]'), then load it again - or use a GGUF (Q4_K) "
                              "or fp8 file of the model.")
    raise CheckpointError(f"{Path(path).name} is a bitsandbytes NF4 checkpoint; Atelier does not load NF4 "
                          "weights yet. Use a GGUF (Q4_K, Q8_0) or fp8 file of the model.")


def _is_gguf(path: Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def tensor_family(sd: Mapping[str, object], metadata_arch: str | None = None) -> str | None:
    """'flux', 'sd3', 'sdxl', 'sd2' or 'sd1' from a diffusion model's keys (with or without prefix)."""
    if transformer_prefix(sd) is not None:
        arch = next(a for a in FLOW_ARCHES if a.matches(sd)).arch
        return "flux" if arch.startswith("flux") else "sd3"
    prefix = unet_prefix(sd)
    if prefix is None:
        return None
    if any(k.startswith(prefix + "label_emb.") for k in sd):
        return "sdxl"
    proj_in = next((v for k, v in sd.items() if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    if proj_in is not None and len(proj_in.shape) == 2:  # SD2's linear projections (SDXL has label_emb)
        return "sd2" if metadata_arch != "sd1" else "sd1"
    return "sd1"


def unet_prefix(sd: Mapping[str, object]) -> str | None:
    """Where an ldm UNet's keys start: 'model.diffusion_model.' or '' (ComfyUI-GGUF's UNet files)."""
    for prefix in ("model.diffusion_model.", ""):
        if prefix + "input_blocks.0.0.weight" in sd:
            return prefix
    return None


def name_family(filename: str) -> str | None:
    low = filename.lower()
    return next((fam for pattern, fam in _NAME_FAMILIES if re.search(pattern, low)), None)


_LABELS = {"flux": "a FLUX.1 transformer", "sd3": "an SD3 / SD3.5 transformer", "sdxl": "an SDXL UNet",
           "sd2": "an SD 2.x UNet", "sd1": "an SD 1.x UNet"}


def check_gguf(path: Path) -> str:
    """Check a GGUF file without reading its weights; returns the family its tensors are."""
    path = Path(path)
    contents = inspect_gguf(path)
    found = tensor_family(contents.tensors, contents.architecture)
    if found is None and contents.architecture in ("t5encoder", "t5"):
        raise CheckpointError(f"{path.name} is a T5 text encoder (GGUF architecture {contents.architecture!r}), "
                              "not a diffusion model: put it in models/text_encoder and choose it in the VAE / "
                              "Text Encoder picker for FLUX.1 or SD3.5")
    if found is None:
        raise CheckpointError(f"{path.name} holds no FLUX.1, SD3 or SD UNet tensors (GGUF architecture "
                              f"{contents.architecture!r}); is it a text encoder or an LLM?")
    meta = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3"}.get(contents.architecture or "")
    named = name_family(path.name)
    for claim, source in ((meta, f"its GGUF architecture {contents.architecture!r}"), (named, "its name")):
        if claim is not None and claim != found and not {claim, found} <= {"sd1", "sd2"}:
            raise CheckpointError(f"{path.name}: {source} says {claim.upper()}, but its tensors are "
                                  f"{_LABELS[found]}. The file is mislabelled; download the right one.")
    return found


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """key -> safetensors dtype name, from the (validated) header."""
    _, header = _check_safetensors_header(Path(path))
    return {k: str(v.get("dtype")) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def check_weights_file(path: Path) -> None:
    """The checks that need no weights: GGUF entries and architecture, NF4 needing bitsandbytes, fp8 support."""
    path = Path(path)
    if _is_gguf(path):
        check_gguf(path)
        return
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return
    dtypes = safetensors_dtypes(path)
    if any(NF4_MARKER in k for k in dtypes):
        require_bitsandbytes(path)
    if any(d in FP8_DTYPES for d in dtypes.values()):
        require_fp8(path.name)


def read_weights(path: Path, dtype: torch.dtype | None = None, channels_last: tuple[str, ...] = ()) -> Weights:
    """A checkpoint's tensors with GGUF blocks and fp8 kept packed (see the module doc)."""
    path = Path(path)
    if _is_gguf(path):
        check_gguf(path)
        return dict(read_gguf(path).tensors)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        check_weights_file(path)
    return pack_fp8(read_state_dict(path, dtype=dtype, channels_last=channels_last))


def _fp8_format(dtype: torch.dtype) -> str | None:
    return next((fmt for fmt, name in FP8_DTYPES.items() if getattr(torch, name, None) == dtype), None)


def pack_fp8(sd: Mapping[str, torch.Tensor]) -> Weights:
    """float8 weights -> PackedTensor (scaled by their `scale_weight` / `weight_scale`); the rest unchanged."""
    scales = {}
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        if leaf in SCALE_SUFFIXES:
            scales[f"{stem}.weight" if stem else "weight"] = value.float()
    out: Weights = {}
    for key, value in sd.items():
        leaf = key.rpartition(".")[2]
        if leaf in SCALE_SUFFIXES or leaf in DROPPED_KEYS:
            continue
        fmt = _fp8_format(value.dtype)
        if fmt is None:
            out[key] = value
        elif value.ndim >= 2:
            out[key] = PackedTensor(value, fmt, tuple(value.shape), scales.get(key))
        else:  # fp8 norms or biases: too small to keep packed
            out[key] = value.float() * scales[key] if key in scales else value.float()
    return out


def unpacked(sd: Mapping[str, torch.Tensor | PackedTensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Packed tensors restored to `dtype` (for the parts that are built as plain floats: VAE, CLIP)."""
    return {k: v.restore(dtype) if isinstance(v, PackedTensor) else v for k, v in sd.items()}


def format_name(fmt_or_dtype: str | torch.dtype) -> str:
    """'Q8_0', 'fp8_e4m3fn', 'bf16', ... for infotext and the model list."""
    if isinstance(fmt_or_dtype, torch.dtype):
        return DTYPE_NAMES.get(fmt_or_dtype) or _fp8_name(fmt_or_dtype)
    return FORMAT_NAMES.get(fmt_or_dtype, fmt_or_dtype)


def _fp8_name(dtype: torch.dtype) -> str:
    fmt = _fp8_format(dtype)
    return FORMAT_NAMES[fmt] if fmt else str(dtype).removeprefix("torch.")


def weight_format(module: nn.Module) -> str:
    """The format that holds most of `module`'s weights (by element count): packed or its float dtype."""
    counts: dict[str, int] = {}
    for sub in module.modules():
        restore = packed_weight(sub)
        if restore is not None:
            name, size = format_name(restore.format), _numel(restore.shape)
        elif isinstance(sub._parameters.get("weight"), torch.Tensor):
            name, size = format_name(sub._parameters["weight"].dtype), sub._parameters["weight"].numel()
        else:
            continue
        counts[name] = counts.get(name, 0) + size
    return max(counts, key=counts.get) if counts else ""


def file_weight_format(path: Path) -> str | None:
    """The stored format of most of a file's weights, from its header only ('Q8_0', 'fp8_e4m3fn', 'bf16')."""
    path = Path(path)
    try:
        if _is_gguf(path):
            return format_name(inspect_gguf(path).weight_format)
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
            return None
        _, header = _check_safetensors_header(path)
    except CheckpointError:
        return None
    counts: dict[str, int] = {}
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("shape", ())) >= 2:
            name = format_name(str(entry.get("dtype")))
            counts[name] = counts.get(name, 0) + _numel(tuple(entry["shape"]))
    return max(counts, key=counts.get) if counts else None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total
