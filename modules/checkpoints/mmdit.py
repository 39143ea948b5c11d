"""FLUX.1 and SD3.5: detection entries, widths from shapes, and building the diffusers modules.

Detection works on the transformer's own keys, with or without the all-in-one prefix
`model.diffusion_model.`. Every width comes from a tensor shape; what weights cannot show
follows the family's rule (FLUX's RoPE axes: 1/8 of a head for the index axis, the rest
split evenly between height and width, even sizes - (16, 56, 56) for the real 128-wide heads).
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modules.checkpoints.convert import VAE_PARTS, _assign, _only_meta_free, build_vae, vae_source
from modules.checkpoints.families import FAMILIES, Family, variant
from modules.checkpoints.flow_arch import FLOW_ARCHES, FlowArch, transformer_prefix  # noqa: F401 (re-exported)
from modules.checkpoints.keys import has_prefix
from modules.checkpoints.mmdit_keys import flux_to_diffusers, sd3_to_diffusers
from modules.errors import CheckpointError

StateDict = Mapping[str, torch.Tensor]
ENCODER_PREFIX = "text_encoders.{}.transformer."
VAE_PREFIXES = ("vae.", "first_stage_model.")


def _count(sd: StateDict, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    side = 2 * math.floor(head_dim * 7 / 32)
    return (head_dim - 2 * side, side, side)


def infer_flux_config(sd: StateDict) -> dict[str, Any]:
    """FluxTransformer2DModel config from BFL keys (prefix removed)."""
    hidden, in_ch = sd["img_in.weight"].shape
    head_dim = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    return {"patch_size": 1, "in_channels": int(in_ch), "out_channels": int(sd["final_layer.linear.weight"].shape[0]),
            "num_layers": _count(sd, "double_blocks."), "num_single_layers": _count(sd, "single_blocks."),
            "attention_head_dim": head_dim, "num_attention_heads": int(hidden) // head_dim,
            "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
            "pooled_projection_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
            "guidance_embeds": "guidance_in.in_layer.weight" in sd, "axes_dims_rope": flux_rope_axes(head_dim)}


def infer_sd3_config(sd: StateDict) -> dict[str, Any]:
    """SD3Transformer2DModel config from Stability MMDiT keys (prefix removed)."""
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    qk = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = int(qk.shape[0]) if qk is not None else 64
    depth = _count(sd, "joint_blocks.")
    dual = tuple(sorted({int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.") and ".attn2." in k}))
    return {"sample_size": 128, "patch_size": int(patch), "in_channels": int(in_ch), "num_layers": depth,
            "attention_head_dim": head_dim, "num_attention_heads": int(hidden) // head_dim,
            "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]), "caption_projection_dim": int(hidden),
            "pooled_projection_dim": int(sd["y_embedder.mlp.0.weight"].shape[1]),
            "out_channels": int(sd["final_layer.linear.weight"].shape[0]) // int(patch * patch),
            "pos_embed_max_size": math.isqrt(int(sd["pos_embed"].shape[1])),
            "dual_attention_layers": dual, "qk_norm": "rms_norm" if qk is not None else None}


def build_transformer(sd: StateDict, prefix: str, fam: Family, *, device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The diffusers transformer of `fam` from original-layout tensors under `prefix`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    source = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        if fam.transformer == "flux":
            config = infer_flux_config(source)
            state = flux_to_diffusers(source, config["num_attention_heads"] * config["attention_head_dim"])
            cls = FluxTransformer2DModel
        else:
            config = infer_sd3_config(source)
            state = sd3_to_diffusers(source, config["num_layers"])
            cls = SD3Transformer2DModel
    except KeyError as err:
        raise CheckpointError(f"This {fam.label} transformer lacks tensor {err.args[0]}") from err
    with torch.device("meta"):
        model = cls(**config)
    _assign(model, state, f"{fam.label} transformer", device, dtype)
    _only_meta_free(model, f"{fam.label} transformer")
    return model, config


# ---------------------------------------------------------------- text encoders

def infer_t5_config(sd: StateDict) -> dict[str, Any]:
    """transformers.T5Config keyword arguments (T5 v1.1 encoder, gated GELU) from its tensors."""
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0])
    return {"vocab_size": int(vocab), "d_model": int(d_model), "num_heads": int(heads), "d_kv": inner // int(heads),
            "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
            "num_layers": _count(sd, "encoder.block."), "relative_attention_num_buckets": int(buckets),
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
            "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1}


def infer_hf_clip_config(sd: StateDict, name: str) -> dict[str, Any]:
    """transformers.CLIPTextConfig kwargs for a CLIP-L / CLIP-G file in transformers' layout."""
    tok = sd["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    proj = sd.get("text_projection.weight")
    g = name == "clip_g"
    return {"vocab_size": int(tok.shape[0]), "hidden_size": hidden,
            "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": _count(sd, "text_model.encoder.layers."),
            "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": "gelu" if g else "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": int(proj.shape[0]) if proj is not None else hidden,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0 if g else 49407}


def build_hf_encoder(sd: StateDict, name: str, fam: Family, *, device: torch.device, dtype: torch.dtype
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A transformers CLIP or T5 encoder from a state dict already in transformers' layout."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    what = f"{name} text encoder"
    try:
        if name == "t5xxl":
            config = infer_t5_config(sd)
            with torch.device("meta"):
                model = T5EncoderModel(T5Config(**config))
            state = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
            state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
        else:
            config = infer_hf_clip_config(sd, name)
            projected = fam.transformer == "sd3"  # SD3 uses both CLIPs' projected pooled outputs
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            with torch.device("meta"):
                model = cls(CLIPTextConfig(**config))
            keep = model.state_dict()
            inner = "text_model." if "text_model.final_layer_norm.weight" in keep else ""
            state = {inner + k.removeprefix("text_model."): v for k, v in sd.items()
                     if not k.endswith("position_ids") and not k.startswith("text_projection")}
            if "text_projection.weight" in keep and "text_projection.weight" in sd:
                state["text_projection.weight"] = sd["text_projection.weight"]
    except KeyError as err:
        raise CheckpointError(f"The {what} lacks tensor {err.args[0]}; is it a {name} file?") from err
    _assign(model, state, what, device, dtype)
    for buf_name, buf in list(model.named_buffers()):
        if buf_name.endswith("position_ids") and buf.is_meta:
            owner = model.get_submodule(buf_name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand(1, -1),
                                  persistent=False)
    _only_meta_free(model, what)
    return model, config


def encoder_state(sd: StateDict, name: str) -> dict[str, torch.Tensor] | None:
    """The all-in-one file's `text_encoders.NAME.transformer.*` tensors, prefix removed (None if absent)."""
    prefix = ENCODER_PREFIX.format(name)
    if not has_prefix(sd, prefix):
        return None
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def embedded_vae(sd: StateDict) -> dict[str, torch.Tensor] | None:
    for prefix in VAE_PREFIXES:
        source = vae_source(sd, prefix)
        if source:
            return source
    return None


def vae16_config(source: StateDict, fam: Family) -> dict[str, Any]:
    from modules.checkpoints.detect import infer_vae_config

    cfg = infer_vae_config(source, prefix="")
    quant = "quant_conv.weight" in source
    return {**cfg, "scaling_factor": fam.latent.scale, "shift_factor": fam.latent.shift,
            "use_quant_conv": quant, "use_post_quant_conv": quant, "sample_size": fam.size}


def build_vae16(source: StateDict, fam: Family, *, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not any(k.startswith(VAE_PARTS) for k in source):
        raise CheckpointError(f"This file holds no VAE tensors; {fam.label} needs {fam.vae_hint} in models/VAE")
    config = vae16_config(source, fam)
    if config["latent_channels"] != fam.latent.channels:
        raise CheckpointError(f"The VAE has {config['latent_channels']} latent channels; {fam.label} needs "
                              f"{fam.latent.channels} ({fam.vae_hint}), not an SD 1.x / SDXL VAE")
    return build_vae(dict(source), config, device=device, dtype=dtype), config


def family_for(arch: str, path: Path | None = None) -> Family:
    """The family of a detected arch; with the file / folder `path`, SD3.5 Large Turbo is told from Large."""
    fam = FAMILIES[arch]
    if path is None:
        return fam
    return variant(fam, Path(path).name, safetensors_metadata(Path(path)))


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's header ({} for other files or an unreadable header)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if length <= 100 * 1024 * 1024 else {}
    except (OSError, struct.error, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (empty for other files or an unreadable header)."""
    meta = _safetensors_header(Path(path)).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def is_flow_file(path: Path) -> bool:
    """Whether a checkpoint file (header only) or diffusers folder holds a FLUX.1 / SD3.5 transformer."""
    path = Path(path)
    if path.is_dir():
        return (path / "transformer" / "config.json").is_file()
    return transformer_prefix(dict.fromkeys(_safetensors_header(path))) is not None
