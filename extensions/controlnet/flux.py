"""FLUX.1 ControlNets: InstantX / diffusers (`FluxControlNetModel`), InstantX/Shakker Union and XLabs.

All three run as diffusers' `FluxControlNetModel`:
- InstantX and Union files are in its own layout (`controlnet_x_embedder`, `transformer_blocks`,
  `single_transformer_blocks`, `controlnet_blocks`, `controlnet_single_blocks`; Union adds
  `controlnet_mode_embedder`). Their hint is VAE-encoded (the model's scaled latents) and packed
  into 2x2 patches, as diffusers' FluxControlNetPipeline does; their block samples are spread over
  the transformer's blocks (block i takes sample i // ceil(blocks / samples)).
- XLabs files are BFL-style (`double_blocks.N`, `img_in`, ..., `input_hint_block.{0..14}`,
  `pos_embed_input`, `controlnet_blocks.N`) and become the same model with diffusers'
  `input_hint_block` (pixels in -1..1, three stride-2 convolutions, then packed); their samples
  repeat over the double blocks (block i takes sample i % samples), as XLabs' Flux does.
The residuals reach the transformer through the `unet_residuals` hook as `UNetResiduals.blocks` and
`.single_blocks`, one tensor per block (plugin API 1.9); the BFL-named tensors of XLabs files are
converted by `api.flux_keys_to_diffusers` (plugin API 1.11).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from modules.plugins import api

StateDict = Mapping[str, torch.Tensor]
KIND = "flux_controlnet"
# InstantX / Shakker-Labs FLUX.1 Union control modes
UNION_MODES = ("Canny", "Tile", "Depth", "Blur", "OpenPose", "Gray", "Low Quality")
_MODE_BY_TAG = {"Canny": 0, "Lineart": 0, "Tile": 1, "Depth": 2, "OpenPose": 4}
_MODE_BY_MODULE = {"blur_gaussian": 3}

_OWN = ("controlnet_blocks.", "input_hint_block.", "pos_embed_input.")  # XLabs' ControlNet-only tensors


# ---------------------------------------------------------------- detection and keys
def is_xlabs(sd: StateDict) -> bool:
    return "input_hint_block.0.weight" in sd and "double_blocks.0.img_attn.qkv.weight" in sd


def _hint_key(index: int) -> str:
    """XLabs' input_hint_block Sequential index (convolutions at 0, 2, ..., 14) -> diffusers' name."""
    if index == 0:
        return "input_hint_block.conv_in"
    if index == 14:
        return "input_hint_block.conv_out"
    return f"input_hint_block.blocks.{index // 2 - 1}"


def _own_key(key: str) -> str:
    """An XLabs ControlNet-only tensor's diffusers name (the rest are FLUX.1's, converted by the plugin API)."""
    head, _, rest = key.partition(".")
    if head != "input_hint_block":
        return "controlnet_x_embedder." + rest if head == "pos_embed_input" else key
    index, _, leaf = rest.partition(".")
    if not index.isdigit():
        raise api.InvalidParams(f"unexpected tensor {key}")
    return f"{_hint_key(int(index))}.{leaf}"


def xlabs_to_diffusers(sd: StateDict) -> dict[str, torch.Tensor]:
    """XLabs FLUX.1 ControlNet keys -> diffusers FluxControlNetModel keys (with `input_hint_block`)."""
    own = {k: t for k, t in sd.items() if k.startswith(_OWN)}
    try:
        out = {_own_key(k): t for k, t in own.items()}
        out.update(api.flux_keys_to_diffusers({k: t for k, t in sd.items() if k not in own}))
    except api.InvalidParams as err:
        raise api.InvalidParams(f"Unsupported XLabs FLUX.1 ControlNet: {err}") from None
    return out


def _count(sd: StateDict, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def rope_axes(head_dim: int) -> list[int]:
    """FLUX.1's RoPE axes for a head width: (16, 56, 56) for 128, the same rule as the transformer's."""
    side = 2 * math.floor(head_dim * 7 / 32)
    return [head_dim - 2 * side, side, side]


def infer_config(sd: StateDict) -> dict[str, Any]:
    """A FluxControlNetModel config from its (diffusers-keyed) tensors."""
    hidden, in_channels = (int(n) for n in sd["x_embedder.weight"].shape)
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    config: dict[str, Any] = {
        "patch_size": 1, "in_channels": in_channels, "num_layers": _count(sd, "transformer_blocks."),
        "num_single_layers": _count(sd, "single_transformer_blocks."), "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim, "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": rope_axes(head_dim)}
    if "controlnet_mode_embedder.weight" in sd:
        config["num_mode"] = int(sd["controlnet_mode_embedder.weight"].shape[0])
    if "input_hint_block.conv_in.weight" in sd:
        config["conditioning_embedding_channels"] = int(sd["input_hint_block.conv_out.weight"].shape[0])
        config["patch_size"] = 2  # diffusers packs the hint block's features in 2x2 patches by this field
    return config


def build(state: StateDict, config: dict[str, Any] | None, name: str, device: torch.device,
          dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' FluxControlNetModel with the file's tensors (built on the meta device, then assigned)."""
    from diffusers import FluxControlNetModel

    config = dict(config) if config is not None else infer_config(state)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FluxControlNetModel.from_config(config)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise api.InvalidParams(f"FLUX.1 ControlNet {name} does not fit its detected layout: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- union modes
def union_mode(unit: Any, module: str, tag: str, modes: int) -> int:
    """The Union control mode: `union_control_type` by name or number, else the preprocessor's Control Type."""
    value = unit.union_control_type.strip()
    names = [n.lower().replace(" ", "") for n in UNION_MODES]
    key = value.lower().replace(" ", "")
    if value.isdigit():
        mode = int(value)
    elif key in names:
        mode = names.index(key)
    elif key == "unknown" and (module in _MODE_BY_MODULE or tag in _MODE_BY_TAG):
        mode = _MODE_BY_MODULE.get(module, _MODE_BY_TAG.get(tag, -1))
    else:
        mode = -1
    if not 0 <= mode < modes:
        raise api.InvalidParams(f"controlnet unit field 'union_control_type': {value!r} does not pick a control mode "
                                f"of the FLUX.1 Union ControlNet {unit.model!r}; use one of "
                                f"{list(UNION_MODES[:modes])} (by name or number)")
    return mode


# ---------------------------------------------------------------- residuals
def spread(samples: Sequence[torch.Tensor], count: int, repeat: bool) -> tuple[torch.Tensor, ...]:
    """One sample per transformer block: repeated (XLabs) or spread in runs (diffusers' interval)."""
    if not samples:
        return ()
    interval = math.ceil(count / len(samples))
    return tuple(samples[i % len(samples)] if repeat else samples[i // interval] for i in range(count))


class FluxResiduals:
    """The engine's `UNetCall -> UNetResiduals` for one FLUX.1 pass: the active units' block residuals, summed.

    `units` holds (index, unit, model name, mode or None, weight window test); `models(device, dtype)`
    gives the built FluxControlNetModels in that order; `hints` are the units' [1, 3, H, W] hints in 0..1."""

    def __init__(self, units: Sequence[tuple[Any, int | None]], hints: Sequence[torch.Tensor],
                 models: Callable[[torch.device, torch.dtype], list[torch.nn.Module]],
                 context: Any, active: Callable[[Any, int, int], bool], guidance: float) -> None:
        self.units, self.hints, self.models, self.context = units, hints, models, context
        self.active, self.guidance = active, guidance
        self.steps = len(context.sigmas) - 1
        self.conds: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}  # encoded hints, once per pass
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, call: api.UNetCall) -> api.UNetResiduals | None:
        if call.block_counts is None:
            raise api.InvalidParams("FLUX.1 ControlNets run on FLUX.1 transformers only")
        step = self.context.step
        live = [k for k, (p, _) in enumerate(self.units) if self.active(p.unit, step, self.steps)]
        self.calls.append((step, tuple(self.units[k][0].index for k in live)))
        if not live:
            return None
        models = self.models(call.model_in.device, call.model_in.dtype)
        total = None
        for k in live:
            residual = self._unit(k, models[k], call)
            total = residual if total is None else total + residual
        return total

    def _cond(self, k: int, model: torch.nn.Module, call: api.UNetCall) -> torch.Tensor:
        """The hint as the model takes it: pixels in -1..1 (XLabs), else packed VAE latents."""
        key = (k, str(call.model_in.device), call.model_in.dtype)
        if key not in self.conds:
            pixels = self.hints[k] * 2.0 - 1.0
            if model.input_hint_block is not None:
                cond = pixels
            else:
                if self.context.encode is None:
                    raise api.InvalidParams("this FLUX.1 ControlNet needs the engine's VAE encoder (plugin API 1.9)")
                latents = self.context.encode(pixels)
                b, c, h, w = latents.shape
                cond = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
            self.conds[key] = cond.to(device=call.model_in.device, dtype=call.model_in.dtype)
        return self.conds[key]

    def _unit(self, k: int, model: torch.nn.Module, call: api.UNetCall) -> api.UNetResiduals:
        p, mode = self.units[k]
        rows, dtype, device = call.model_in.shape[0], call.model_in.dtype, call.model_in.device
        cond = self._cond(k, model, call)
        added = call.added_cond or {}
        guidance = None
        if model.config.guidance_embeds:
            guidance = added.get("guidance")
            if guidance is None:
                guidance = torch.full((rows,), float(self.guidance), device=device, dtype=dtype)
        extra = {}
        if mode is not None:
            extra["controlnet_mode"] = torch.full((rows, 1), mode, device=device, dtype=torch.long)
        blocks, singles = model(hidden_states=call.model_in, controlnet_cond=cond.expand(rows, *cond.shape[1:]),
                                conditioning_scale=1.0, encoder_hidden_states=call.cross_attn,
                                pooled_projections=added["pooled_projections"], timestep=call.timestep,
                                img_ids=added["img_ids"], txt_ids=added["txt_ids"], guidance=guidance,
                                return_dict=False, **extra)
        weight = torch.full((rows, 1, 1), float(p.unit.weight), device=device, dtype=dtype)
        if p.unit.control_mode == 2:  # "ControlNet is more important": the prompt's rows only
            weight = weight * (~call.uncond).to(device=device, dtype=dtype)[:, None, None]
        repeat = model.input_hint_block is not None
        n_double, n_single = call.block_counts
        single = spread([s * weight for s in singles or ()], n_single, False) or None
        return api.UNetResiduals(blocks=spread([b * weight for b in blocks], n_double, repeat), single_blocks=single)
