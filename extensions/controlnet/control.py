"""A job's ControlNet units at sampling time: hints (preprocessed once per job), guidance windows,
control modes, and the residual function the engine calls at every UNet evaluation.

Facts from sd-webui-controlnet: a unit is off at step i of N when i/N < guidance_start or
i/N > guidance_end; "My prompt is more important" scales the residuals by 0.825^(n-1-k)
(k-th of n outputs, so the middle block keeps the full weight); "ControlNet is more important"
does the same and adds residuals to the prompt's rows only, not the negative prompt's;
an inpaint hint (RGBA) becomes `rgb * (1 - m) - m` with the mask binarised at 0.5.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules.plugins import api

from . import flux, ip_adapter, preprocessors
from .annotators import Annotators
from .annotators.faces import FaceAnalyzer, align
from .models import FAMILIES, ControlNetLibrary, family
from .units import Unit


@dataclass(frozen=True)
class Planned:
    """One active unit of a job, its model file and preprocessor."""

    index: int
    unit: Unit
    path: Path | None  # None: a reference-only unit (no model file)
    pre: preprocessors.Preprocessor


def resolved(unit: Unit, pre: preprocessors.Preprocessor) -> Unit:
    """Out-of-range slider values (the API's -1) -> the preprocessor's defaults, as sd-webui-controlnet does."""
    changes = {}
    for name, slider in (("processor_res", pre.resolution), ("threshold_a", pre.a), ("threshold_b", pre.b)):
        value = getattr(unit, name)
        if slider is not None and not slider.min <= value <= slider.max:
            changes[name] = type(value)(slider.value)
    return replace(unit, **changes)


def plan_units(units: Sequence[Unit], library: ControlNetLibrary) -> list[Planned]:
    """The units that change anything (enabled, weight not 0), checked: module, model; InvalidParams otherwise."""
    planned = []
    for i, unit in enumerate(units):
        if not unit.active:
            continue
        pre = preprocessors.find(unit.module)
        if pre is None:
            known = ", ".join(p.name for p in preprocessors.PREPROCESSORS)
            raise api.InvalidParams(f"controlnet unit {i}: unknown module {unit.module!r} (known: {known})")
        if pre.tag == "Reference":  # reference-only: no control model (its `model` is ignored, as upstream)
            planned.append(Planned(i, resolved(unit, pre), None, pre))
            continue
        if unit.model in ("", "None", "none"):
            raise api.InvalidParams(f"controlnet unit {i} is enabled but names no model; pick one of "
                                    f"{library.names() or 'the models in models/ControlNet (none found)'}")
        path = library.find(unit.model)
        if path is None:
            raise api.InvalidParams(f"controlnet unit {i}: model {unit.model!r} not found in "
                                    f"{', '.join(str(r) for r in library.roots)} (found: {library.names() or 'none'})")
        planned.append(Planned(i, resolved(unit, pre), path, pre))
    return planned


KINDS = {"controlnet": "ControlNet", "controlnet_union": "ControlNet", "control_lora": "Control-LoRA",
         "t2i_adapter": "T2I-Adapter", "ip_adapter": "IP-Adapter", flux.KIND: "ControlNet"}
FLOW = ("flux", "sd3")  # architectures without a UNet: FLUX.1 runs FLUX.1 ControlNets, SD3.5 none yet


def check_arch(planned: Sequence[Planned], library: ControlNetLibrary, arch: str) -> None:
    """One clear message when a control model was made for another architecture than the loaded checkpoint."""
    for p in planned:
        if p.path is None:
            if arch.startswith(FLOW):
                raise api.InvalidParams(f"controlnet unit {p.index} ({p.unit.module}) needs a UNet checkpoint "
                                        f"(SD1.5, SD2.x, SDXL), but the loaded checkpoint is "
                                        f"{FAMILIES.get(arch, arch)}: load one of those, or disable the unit")
            continue
        cn = library.read(p.path)
        if cn.arch == family(arch) or (cn.arch == "" and not arch.startswith(FLOW)):
            continue  # "": an IP-Adapter of no released width, checked against the text states at run time
        kind, ours = KINDS.get(cn.kind, cn.kind), FAMILIES.get(arch, arch)
        theirs = FAMILIES.get(cn.arch, "another model's")
        message = (f"{kind} {p.unit.model!r} (unit {p.index}) is a {theirs} {kind}, but the loaded checkpoint is "
                   f"{ours}: ")
        if arch.startswith("sd3"):
            message += (f"ControlNets for {ours} are not supported yet; load a {theirs} checkpoint, or disable the "
                        "ControlNet unit")
        elif arch.startswith("flux"):
            message += f"use a FLUX.1 ControlNet (XLabs, InstantX or Union), or load a {theirs} checkpoint"
        else:
            message += f"use a {kind} made for {ours}, or load a {theirs} checkpoint"
        raise api.InvalidParams(message)


def flux_residuals(planned: Sequence[Planned], hints: Sequence[torch.Tensor], library: ControlNetLibrary,
                   context: api.DenoiserContext) -> flux.FluxResiduals:
    """The residual function of a FLUX.1 pass (each Union unit's control mode checked here, before sampling)."""
    units = []
    for p in planned:
        modes = library.read(p.path).state.get("controlnet_mode_embedder.weight")
        mode = None if modes is None else flux.union_mode(p.unit, p.pre.name, p.pre.tag, int(modes.shape[0]))
        units.append((p, mode))
    paths = [p.path for p in planned]
    guidance = float(getattr(context.params, "distilled_cfg_scale", None) or 3.5)
    return flux.FluxResiduals(units, hints, lambda device, dtype: library.models(paths, None, device, dtype),
                              context, active, guidance)


# ---------------------------------------------------------------- hints
def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: int) -> int:
    """sd-webui-controlnet's pixel-perfect processor resolution for a target size."""
    k0, k1 = height / image.height, width / image.width
    k = min(k0, k1) if resize_mode == 2 else max(k0, k1)
    return int(round(k * min(image.height, image.width)))


def detect(p: Planned, image: Image.Image, mask: Image.Image | None, width: int, height: int, seed: int,
           annotators: Annotators) -> np.ndarray:
    """The unit's detected map (runs the preprocessor; callers cache it per job)."""
    unit = p.unit
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(image, width, height, unit.resize_mode)
    return preprocessors.run(p.pre, image, mask, resolution, unit.threshold_a, unit.threshold_b, seed, annotators)


def _resize(channels: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    image = Image.fromarray(channels)
    shrink = size[0] < image.width
    method = Image.Resampling.NEAREST if nearest else (Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)
    return np.asarray(image.resize(size, method))


def fit(detected: np.ndarray, width: int, height: int, resize_mode: int) -> np.ndarray:
    """The detected map at width x height by the unit's resize mode (0 stretch, 1 crop, 2 fill with black)."""
    h, w = detected.shape[:2]
    if resize_mode == 0:
        scale_w, scale_h = width, height
    else:
        k = max(width / w, height / h) if resize_mode == 1 else min(width / w, height / h)
        scale_w, scale_h = max(1, round(w * k)), max(1, round(h * k))
    rgb = _resize(detected[..., :3], (scale_w, scale_h), nearest=False)
    parts = [rgb]
    if detected.shape[2] == 4:
        parts.append(_resize(detected[..., 3], (scale_w, scale_h), nearest=True)[..., None])
    resized = np.concatenate(parts, axis=2)
    canvas = np.zeros((height, width, detected.shape[2]), np.uint8)
    top, left = (height - scale_h) // 2, (width - scale_w) // 2
    src = resized[max(0, -top):max(0, -top) + height, max(0, -left):max(0, -left) + width]
    canvas[max(0, top):max(0, top) + src.shape[0], max(0, left):max(0, left) + src.shape[1]] = src
    return canvas


def hint_tensor(fitted: np.ndarray) -> torch.Tensor:
    """[1, 3, H, W] in 0..1; an RGBA inpaint hint -> rgb * (1 - m) - m."""
    t = torch.from_numpy(fitted.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    if t.shape[1] == 4:
        rgb, m = t[:, :3], (t[:, 3:4] > 0.5).float()
        t = rgb * (1 - m) - m
    return t


# ---------------------------------------------------------------- union / ProMax control types
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Canny", "Normal Map", "Segmentation", "Tile", "Inpaint")
_UNION_BY_TAG = {"OpenPose": 0, "Depth": 1, "SoftEdge": 2, "Scribble": 2, "Canny": 3, "Lineart": 3,
                 "NormalMap": 4, "Tile": 6, "Inpaint": 7}


def union_type(p: Planned) -> int:
    """The union ControlNet's control type index: the unit's `union_control_type` (name or number), or
    the preprocessor's Control Type when that is "Unknown"."""
    value = p.unit.union_control_type.strip()
    names = [n.lower().replace(" ", "") for n in UNION_TYPES]
    if value.isdigit() and int(value) < len(UNION_TYPES):
        return int(value)
    if value.lower().replace(" ", "") in names:
        return names.index(value.lower().replace(" ", ""))
    if value.lower() == "unknown" and p.pre.tag in _UNION_BY_TAG:
        return _UNION_BY_TAG[p.pre.tag]
    raise api.InvalidParams(f"controlnet unit {p.index} field 'union_control_type': {value!r} does not pick a control "
                            f"type for the union ControlNet {p.unit.model!r}; use one of {list(UNION_TYPES)}"
                            f"{' (or a preprocessor of one of those types)' if value.lower() == 'unknown' else ''}")


# ---------------------------------------------------------------- the residual function
def active(unit: Unit, step: int, steps: int) -> bool:
    """sd-webui-controlnet's guidance window: off when step/steps < start or > end."""
    fraction = step / max(steps, 1)
    return not (fraction < unit.guidance_start or fraction > unit.guidance_end)


def scales(unit: Unit, n: int) -> list[float]:
    """Per-output weights: the unit's weight, decayed toward the shallow outputs unless Balanced."""
    if unit.control_mode == 0:
        return [unit.weight] * n
    return [unit.weight * 0.825 ** float(n - 1 - k) for k in range(n)]


class Residuals:
    """The engine's `UNetCall -> UNetResiduals` for one pass: the sum over the active units."""

    def __init__(self, planned: Sequence[Planned], hints: Sequence[torch.Tensor], library: ControlNetLibrary,
                 context: api.DenoiserContext, base: torch.nn.Module | None = None) -> None:
        self.planned, self.hints, self.library, self.context = planned, hints, library, context
        self.base = base  # the loaded UNet, for Control-LoRAs
        self.steps = len(context.sigmas) - 1
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (step, units used), for tests and benchmarks
        self.features: dict[tuple[int, str, torch.dtype], list[torch.Tensor]] = {}  # T2I-Adapter outputs
        self.union = {p.index: union_type(p) for p in planned if library.read(p.path).kind == "controlnet_union"}

    def __call__(self, call: api.UNetCall) -> api.UNetResiduals | None:
        step = self.context.step
        live = [(p, h) for p, h in zip(self.planned, self.hints, strict=True) if active(p.unit, step, self.steps)]
        self.calls.append((step, tuple(p.index for p, _ in live)))
        if not live:
            return None
        dtype, device = call.model_in.dtype, call.model_in.device
        pooled = None if call.added_cond is None else int(call.added_cond["text_embeds"].shape[-1])
        models = self.library.models([p.path for p, _ in live], pooled, device, dtype, self.base)
        total = None
        for (p, hint), model in zip(live, models, strict=True):
            if self.library.read(p.path).kind == "t2i_adapter":
                residual = self._adapter(p, hint, model, call)
            else:
                residual = self._controlnet(p, hint, model, call)
            total = residual if total is None else total + residual
        return total

    def _weighted(self, unit: Unit, outs: list[torch.Tensor], call: api.UNetCall) -> list[torch.Tensor]:
        """The unit's weight (and control mode) applied to its outputs."""
        weights = scales(unit, len(outs))
        if unit.control_mode != 2:
            return [o * w for o, w in zip(outs, weights, strict=True)]
        # "ControlNet is more important": the prompt's rows only
        mark = (~call.uncond).to(device=outs[0].device, dtype=outs[0].dtype)[:, None, None, None]
        return [o * w * mark for o, w in zip(outs, weights, strict=True)]

    def _controlnet(self, p: Planned, hint: torch.Tensor, model: torch.nn.Module,
                    call: api.UNetCall) -> api.UNetResiduals:
        rows, dtype, device = call.model_in.shape[0], call.model_in.dtype, call.model_in.device
        cond = hint.to(device=device, dtype=dtype).expand(rows, -1, -1, -1)
        extra: dict[str, Any] = {"controlnet_cond": cond}
        if p.index in self.union:  # union/ProMax: one condition and its control type
            idx = self.union[p.index]
            if idx >= model.config.num_control_type:
                raise api.InvalidParams(f"union ControlNet {p.unit.model!r} knows {model.config.num_control_type} "
                                        f"control types, not {UNION_TYPES[idx]!r} (ProMax adds Tile and Inpaint)")
            types = torch.zeros(rows, model.config.num_control_type, device=device, dtype=dtype)
            types[:, idx] = 1
            extra = {"controlnet_cond": [cond], "control_type": types, "control_type_idx": [idx]}
        down, mid = model(call.model_in, call.timestep, encoder_hidden_states=call.cross_attn,
                          conditioning_scale=1.0, added_cond_kwargs=call.added_cond, return_dict=False, **extra)
        outs = self._weighted(p.unit, [*down, mid], call)
        return api.UNetResiduals(down=tuple(outs[:-1]), mid=outs[-1])

    def _adapter(self, p: Planned, hint: torch.Tensor, model: torch.nn.Module,
                 call: api.UNetCall) -> api.UNetResiduals:
        """T2I-Adapter features depend on the hint only: computed once per pass, added in the down blocks."""
        dtype, device = call.model_in.dtype, call.model_in.device
        key = (p.index, str(device), dtype)
        if key not in self.features:
            self.features[key] = list(model(hint.to(device=device, dtype=dtype)))
        rows = call.model_in.shape[0]
        feats = [f.expand(rows, -1, -1, -1) for f in self.features[key]]
        return api.UNetResiduals(intrablock=tuple(self._weighted(p.unit, feats, call)))


def prepare_hints(planned: Sequence[Planned], state: dict[str, Any], context: api.DenoiserContext,
                  annotators: Annotators, seed: int) -> list[torch.Tensor]:
    """Each unit's hint at the pass's size; the detected maps are computed once per job (`state`)."""
    detected: dict[int, np.ndarray] = state.setdefault("detected", {})
    hints = []
    for p in planned:
        if p.index not in detected:
            image = p.unit.image
            if image is None and context.init_images:
                image = context.init_images[0]
            if image is None:
                raise api.InvalidParams(f"controlnet unit {p.index} has no image: send `image` (base64), "
                                        "or use img2img, whose init image is the default")
            mask = p.unit.mask if p.unit.mask is not None else context.mask
            detected[p.index] = detect(p, image, mask, context.width, context.height, seed, annotators)
            state.setdefault("preprocess_calls", []).append(p.index)
        hints.append(hint_tensor(fit(detected[p.index], context.width, context.height, p.unit.resize_mode)))
    return hints


# ---------------------------------------------------------------- IP-Adapter
def text_width(context: api.DenoiserContext) -> int | None:
    """The width of the pass's text states (the UNet's cross-attention width)."""
    try:
        return int(context.conds[0][0][0][0][1].cross_attn.shape[-1])
    except (IndexError, TypeError, AttributeError):
        return None


def check_ip_unit(p: Planned, sd: ip_adapter.StateDict, context: api.DenoiserContext) -> None:
    """The unit's preprocessor must fit the adapter (CLIP or face); the adapter's width must be the checkpoint's."""
    wanted = ip_adapter.preprocessors_for(sd)
    if p.pre.name not in wanted:
        what = "an IP-Adapter FaceID" if ip_adapter.variant(sd).startswith("faceid") else "an IP-Adapter"
        raise api.InvalidParams(f"IP-Adapter {p.unit.model!r} (unit {p.index}) needs {what} preprocessor "
                                f"({', '.join(wanted)}), not {p.pre.name!r}")
    ours, width = text_width(context), ip_adapter.cross_width(sd)
    if ours is not None and ours != width:
        theirs = FAMILIES.get(ip_adapter.WIDTHS.get(width, ""), f"{width}-wide")
        loaded = FAMILIES.get(context.arch, context.arch)
        raise api.InvalidParams(f"IP-Adapter {p.unit.model!r} (unit {p.index}) is a {theirs} IP-Adapter, but the "
                                f"loaded checkpoint is {loaded} ({ours}-wide text states): use an IP-Adapter made "
                                f"for {loaded}, or load a {theirs} checkpoint")


class IPAttention:
    """The engine's `CrossAttentionCall -> tensor` for one pass: the sum over the active IP-Adapter units."""

    def __init__(self, planned: Sequence[Planned], tokens: Sequence[ip_adapter.ImageTokens],
                 library: ControlNetLibrary, context: api.DenoiserContext) -> None:
        self.planned, self.tokens, self.library, self.context = planned, tokens, library, context
        self.steps = len(context.sigmas) - 1
        self.weights: dict[tuple[int, int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, call: api.CrossAttentionCall) -> torch.Tensor | None:
        total = None
        for p, tokens in zip(self.planned, self.tokens, strict=True):
            if not active(p.unit, self.context.step, self.steps):
                continue
            key = (p.index, call.index, str(call.query.device), call.query.dtype)
            if key not in self.weights:  # moved to the device once per pass
                self.weights[key] = ip_adapter.layer_weights(self.library.read(p.path).state, call, p.unit.model)
            out = ip_adapter.decoupled_attention(self.weights[key], call, tokens, p.unit.weight)
            total = out if total is None else total + out
        return total


def ip_tokens(planned: Sequence[Planned], state: dict[str, Any], context: api.DenoiserContext,
              library: ControlNetLibrary, encoders: dict[Path, Any], clip_vision: Path,
              faces: FaceAnalyzer) -> list[ip_adapter.ImageTokens]:
    """Each IP unit's image tokens, encoded once per job (`state`); FaceID units read faces with `faces`."""
    cached: dict[int, ip_adapter.ImageTokens] = state.setdefault("ip_tokens", {})
    out = []
    for p in planned:
        sd = library.read(p.path).state
        check_ip_unit(p, sd, context)
        if p.index not in cached:
            image = p.unit.image if p.unit.image is not None else (context.init_images or [None])[0]
            if image is None:
                raise api.InvalidParams(f"controlnet unit {p.index} (IP-Adapter) has no image: send `image` (base64)")
            image = image.convert("RGB")
            if ip_adapter.variant(sd).startswith("faceid"):
                cached[p.index] = face_tokens(p, sd, image, faces, partial(_encoder, p, encoders, clip_vision))
            else:
                encoder = _encoder(p, encoders, clip_vision)
                pixels = ip_adapter.image_processor(encoder)(image, return_tensors="pt").pixel_values
                cached[p.index] = ip_adapter.image_tokens(sd, encoder, pixels)
            state.setdefault("preprocess_calls", []).append(p.index)
        out.append(cached[p.index])
    return out


def _encoder(p: Planned, encoders: dict[Path, Any], clip_vision: Path) -> Any:
    """The unit's CLIP vision encoder (the last one loaded is kept)."""
    path = ip_adapter.find_encoder(p.pre.name, clip_vision)
    if path not in encoders:
        encoders.clear()
        encoders[path] = ip_adapter.load_encoder(path, torch.device("cpu"), torch.float32)
    return encoders[path]


def face_tokens(p: Planned, sd: ip_adapter.StateDict, image: Image.Image, faces: FaceAnalyzer,
                encoder: Any) -> ip_adapter.ImageTokens:
    """FaceID tokens: the largest face's embedding; Plus adds CLIP's hidden states of its 224x224 aligned crop."""
    rgb = np.asarray(image)
    face = faces.largest_face(rgb)
    embedding = torch.from_numpy(faces.embedding(rgb, face)).float()[None]
    if ip_adapter.variant(sd) == "faceid":
        return ip_adapter.face_tokens(sd, embedding, None, shortcut=False)
    clip = encoder()
    crop = Image.fromarray(align(rgb, face.landmarks, 224))
    pixels = ip_adapter.image_processor(clip)(crop, return_tensors="pt").pixel_values
    shortcut = "v2" in p.path.name.lower()
    return ip_adapter.face_tokens(sd, embedding, ip_adapter.hidden_states(clip, pixels), shortcut)
