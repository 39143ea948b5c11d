"""Turn original-layout tensors into diffusers / transformers modules without a second full copy.

Modules are constructed on the meta device and then take the checkpoint's tensors with
`load_state_dict(assign=True)`, so the only copies made are dtype / device conversions.
The UNet and VAE key conversions call diffusers' public single-file converters; the CLIP key
mappings (OpenAI CLIP-L and OpenCLIP layouts -> transformers 5 keys) are our own.
Every mapping is checked to be complete in both directions.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modules.checkpoints.keys import UNET, clip_l_prefix
from modules.checkpoints.model import TextEncoderSpec
from modules.checkpoints.packed import PackedTensor, pack_weights
from modules.errors import CheckpointError

StateDict = Mapping[str, torch.Tensor]
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_IGNORED_CLIP = ("embeddings.position_ids", "logit_scale", "attn_mask")


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
            device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Give a meta-device `module` the tensors of `state`; any missing / unexpected / misshaped key fails."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"The {what} weights do not fit the detected architecture: "
                              f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"The {what} tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"the detected architecture needs {tuple(ref.shape)}")
    packed, seen = {}, set()
    state = dict(state)
    for k, v in state.items():
        if isinstance(v, PackedTensor):
            if id(v) in seen:  # a tied weight (T5's shared embedding): its module gets the packed one
                state[k] = v.restore(dtype)
            else:
                packed[k] = v
                seen.add(id(v))
    moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
             if k not in packed}
    module.load_state_dict(moved, strict=not packed, assign=True)
    if packed:  # GGUF blocks and fp8 stay packed; each layer restores its weight per matmul
        pack_weights(module, packed, dtype, device)
    return module.eval().requires_grad_(False)


def _identity(v: torch.Tensor | PackedTensor) -> tuple[int, int]:
    if isinstance(v, PackedTensor):
        return v.storage.data_ptr(), v.storage.numel()
    return v.data_ptr(), v.numel()


def _check_consumed(source: dict[str, torch.Tensor], converted: Mapping[str, torch.Tensor], what: str) -> None:
    """Every source tensor must reach the converted dict (diffusers' converters drop unknown keys)."""
    used = {_identity(v) for v in converted.values()}  # views (1x1 conv -> linear) count
    left = sorted(k for k, v in source.items() if _identity(v) not in used)
    if left:
        raise CheckpointError(f"The {what} has tensors the detected architecture does not use: "
                              f"{left[:5]} ({len(left)} in all)")


def _only_meta_free(module: torch.nn.Module, what: str) -> None:
    still = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still:
        raise CheckpointError(f"The {what} was left without weights for {still[:5]}")


def build_unet(sd: StateDict, config: dict[str, Any], *, device: torch.device, dtype: torch.dtype
               ) -> torch.nn.Module:
    """A diffusers UNet2DConditionModel from `model.diffusion_model.*` tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = {k: v for k, v in sd.items() if k.startswith(UNET)}
    converted = convert_ldm_unet_checkpoint(source, config)
    _check_consumed(source, converted, "UNet")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    _assign(unet, converted, "UNet", device, dtype)
    _only_meta_free(unet, "UNet")
    return unet


def vae_source(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """The ldm VAE tensors under `prefix`, prefix removed (EMA / loss tensors left out)."""
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(VAE_PARTS)}


def _legacy_diffusers_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE files name the mid attention query/key/value/proj_attn."""
    names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in state.items():
        for old, new in names.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def build_vae(source: dict[str, torch.Tensor], config: dict[str, Any], *, device: torch.device,
              dtype: torch.dtype, diffusers_keys: bool = False) -> torch.nn.Module:
    """A diffusers AutoencoderKL from ldm-layout (or diffusers-layout) VAE tensors without prefix."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if diffusers_keys:
        converted = _legacy_diffusers_vae_keys(source)
        for k, v in converted.items():
            if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) and v.ndim == 4:
                converted[k] = v[:, :, 0, 0]
    else:
        converted = convert_ldm_vae_checkpoint(source, config)
        _check_consumed(source, converted, "VAE")
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    _assign(vae, converted, "VAE", device, dtype)
    _only_meta_free(vae, "VAE")
    return vae


def clip_l_keys(sd: StateDict, base: str) -> dict[str, torch.Tensor]:
    """Original CLIP-L keys (`...transformer.text_model.*`) -> transformers 5 core keys."""
    p = clip_l_prefix(sd, base)
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and not k.endswith(_IGNORED_CLIP)}


def open_clip_keys(sd: StateDict, base: str, with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower keys (`...model.*`) -> transformers 5 core keys."""
    out: dict[str, torch.Tensor] = {}
    simple = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    layer_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in sd.items():
        if not key.startswith(base):
            continue
        k = key[len(base):]
        if k in simple:
            out[simple[k]] = value
        elif k == "text_projection":
            if with_projection:  # OpenCLIP computes x @ P; a Linear computes x @ W.T
                out["text_projection.weight"] = value.t().contiguous()
        elif k.startswith("transformer.resblocks."):
            idx, rest = k[len("transformer.resblocks."):].split(".", 1)
            layer = f"encoder.layers.{idx}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{name}.{kind}"] = part
            else:
                part, leaf = rest.rsplit(".", 1)
                if part not in layer_parts:
                    raise CheckpointError(f"Unknown OpenCLIP tensor {key}")
                out[f"{layer}{layer_parts[part]}.{leaf}"] = value
        elif k not in _IGNORED_CLIP:
            raise CheckpointError(f"Unknown OpenCLIP tensor {key}")
    return out


def build_text_encoder(sd: StateDict, spec: TextEncoderSpec, base: str, *, device: torch.device,
                       dtype: torch.dtype) -> torch.nn.Module:
    """A transformers CLIPTextModel (or ...WithProjection when `spec.pooled`) from original keys."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if spec.flavour == "clip_l":
        core = clip_l_keys(sd, base)
    else:
        core = open_clip_keys(sd, base, with_projection=spec.pooled)
    cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**spec.config))
    names = model.state_dict()
    inner = "text_model." if "text_model.final_layer_norm.weight" in names else ""
    state = {(k if k.startswith("text_projection") else inner + k): v for k, v in core.items()}
    what = f"text encoder ({spec.flavour}, {base})"
    _assign(model, state, what, device, dtype)
    for name, buf in list(model.named_buffers()):
        if name.endswith("position_ids") and buf.is_meta:  # non-persistent buffer: rebuild it
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand(1, -1),
                                  persistent=False)
    _only_meta_free(model, what)
    return model
