"""IP-Adapters (Ye et al. 2023): image prompts through decoupled cross-attention.

A file holds `image_proj.*` (the image projection: "base" = a linear map of CLIP's image
embedding to 4 tokens plus LayerNorm; "plus" = a Perceiver resampler over CLIP's penultimate
hidden states) and `ip_adapter.N.to_k_ip` / `to_v_ip` for the N-th attention layer of the UNet
(self and cross layers counted in module order; only cross layers have weights). Each cross-attention
layer adds `weight * softmax(q k_ip^T / sqrt(d)) v_ip` over the image tokens to its text attention
(the `unet_cross_attention` hook). The negative prompt's rows attend to the projection of a zero
image embedding (base) or of a black image's hidden states (plus), as diffusers does.
The CLIP vision encoder comes from `models/clip_vision` through transformers.

FaceID files (`ip-adapter-faceid*`) use the same `ip_adapter.N.to_k_ip/to_v_ip` layers with another
projection of an insightface (ArcFace) face embedding: "faceid" = `image_proj.proj.0/proj.2` (an MLP
with GELU) to N tokens and `norm`; "faceid_plus" = the same MLP's tokens as the latents of a Perceiver
resampler (`image_proj.perceiver_resampler.*`) over CLIP's penultimate hidden states of the aligned face
crop; PlusV2 (told by "v2" in the file name: its tensors are laid out as Plus's) adds those MLP
tokens back (`out = tokens + scale * out`). The negative prompt's rows see the projection of a zero face
embedding (and a black crop's hidden states). Their `*_lora.*` tensors are not applied: load the
matching `ip-adapter-faceid*_lora` file with `<lora:...>`, as sd-webui-controlnet asks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modules.plugins import api

StateDict = Mapping[str, torch.Tensor]
WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # cross-attention width -> family
# The encoder each preprocessor uses (sd-webui-controlnet's names), and the names its file may have.
ENCODERS = {"ip-adapter_clip_sd15": "ViT-H", "ip-adapter_clip_sdxl_plus_vith": "ViT-H", "ip-adapter_clip_sdxl": "ViT-bigG",
            "ip-adapter_face_id_plus": "ViT-H"}
# The preprocessors each variant of adapter takes (sd-webui-controlnet's pairing).
FACE_PREPROCESSORS = {"faceid": ("ip-adapter_face_id",), "faceid_plus": ("ip-adapter_face_id_plus",)}
CLIP_PREPROCESSORS = ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith")
ENCODER_NAMES = {"ViT-H": ("clip_h", "CLIP-ViT-H-14-laion2B-s32B-b79K", "clip_vision_h", "ViT-H-14"),
                 "ViT-bigG": ("clip_g", "CLIP-ViT-bigG-14-laion2B-39B-b160k", "clip_vision_g", "ViT-bigG-14")}


def is_ip_adapter(sd: StateDict) -> bool:
    return any(k.startswith("image_proj.") for k in sd) and any(k.startswith("ip_adapter.") for k in sd)


def cross_width(sd: StateDict) -> int:
    key = next(k for k in sd if k.endswith(".to_k_ip.weight"))
    return int(sd[key].shape[1])


def arch_of(sd: StateDict) -> str:
    """The family by cross-attention width ("" when the width is no released family's)."""
    return WIDTHS.get(cross_width(sd), "")


def is_plus(sd: StateDict) -> bool:
    return "image_proj.latents" in sd


def variant(sd: StateDict) -> str:
    """"base", "plus", "faceid" or "faceid_plus" from the image projection's tensors."""
    if "image_proj.perceiver_resampler.proj_in.weight" in sd:
        return "faceid_plus"
    if "image_proj.proj.0.weight" in sd and "image_proj.proj.3.weight" not in sd:
        return "faceid"
    return "plus" if is_plus(sd) else "base"


def preprocessors_for(sd: StateDict) -> tuple[str, ...]:
    """The preprocessors that give this adapter its input."""
    return FACE_PREPROCESSORS.get(variant(sd), CLIP_PREPROCESSORS)


# ---------------------------------------------------------------- image projection
def project_base(sd: StateDict, embeds: torch.Tensor) -> torch.Tensor:
    """CLIP image embeds [n, d] -> [n, tokens, width]: linear, reshape, LayerNorm."""
    width = int(sd["image_proj.norm.weight"].shape[0])
    x = F.linear(embeds, sd["image_proj.proj.weight"], sd["image_proj.proj.bias"])
    x = x.reshape(embeds.shape[0], -1, width)
    return F.layer_norm(x, (width,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])


def _perceiver_attention(sd: StateDict, p: str, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    dim = latents.shape[-1]
    x = F.layer_norm(x, (dim,), sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"])
    latents = F.layer_norm(latents, (dim,), sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"])
    q = F.linear(latents, sd[f"{p}to_q.weight"])
    k, v = F.linear(torch.cat([x, latents], dim=-2), sd[f"{p}to_kv.weight"]).chunk(2, dim=-1)
    heads = q.shape[-1] // 64 or 1
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return F.linear(out, sd[f"{p}to_out.weight"])


def _resample(sd: StateDict, prefix: str, hidden: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The Perceiver resampler at `prefix`: latents attend to projected hidden states, then proj_out, norm_out."""
    x = F.linear(hidden, sd[f"{prefix}proj_in.weight"], sd[f"{prefix}proj_in.bias"])
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(f"{prefix}layers.")})
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        latents = _perceiver_attention(sd, p + "0.", x, latents) + latents
        dim = latents.shape[-1]
        h = F.layer_norm(latents, (dim,), sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        latents = F.linear(F.gelu(F.linear(h, sd[p + "1.1.weight"])), sd[p + "1.3.weight"]) + latents
    out = F.linear(latents, sd[f"{prefix}proj_out.weight"], sd[f"{prefix}proj_out.bias"])
    width = out.shape[-1]
    return F.layer_norm(out, (width,), sd[f"{prefix}norm_out.weight"], sd[f"{prefix}norm_out.bias"])


def project_plus(sd: StateDict, hidden: torch.Tensor) -> torch.Tensor:
    """CLIP penultimate hidden states [n, patches, d] -> [n, queries, width] (a Perceiver resampler)."""
    return _resample(sd, "image_proj.", hidden, sd["image_proj.latents"].expand(hidden.shape[0], -1, -1))


def project_faceid(sd: StateDict, face: torch.Tensor) -> torch.Tensor:
    """Face embeddings [n, 512] -> [n, tokens, dim]: Linear, GELU, Linear, reshape, LayerNorm."""
    dim = int(sd["image_proj.norm.weight"].shape[0])
    x = F.gelu(F.linear(face, sd["image_proj.proj.0.weight"], sd["image_proj.proj.0.bias"]))
    x = F.linear(x, sd["image_proj.proj.2.weight"], sd["image_proj.proj.2.bias"]).reshape(face.shape[0], -1, dim)
    return F.layer_norm(x, (dim,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])


def project_faceid_plus(sd: StateDict, face: torch.Tensor, hidden: torch.Tensor, shortcut: bool,
                        scale: float = 1.0) -> torch.Tensor:
    """FaceID Plus: the face tokens resampled over the crop's CLIP hidden states (+ the tokens for PlusV2)."""
    tokens = project_faceid(sd, face)
    out = _resample(sd, "image_proj.perceiver_resampler.", hidden, tokens)
    return tokens + scale * out if shortcut else out


# ---------------------------------------------------------------- the CLIP vision encoder
def find_encoder(preprocessor: str, folder: Path) -> Path:
    """The encoder file or folder a preprocessor needs in models/clip_vision; InvalidParams names it."""
    kind = ENCODERS[preprocessor]
    names = ENCODER_NAMES[kind]
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            stem = path.name if path.is_dir() else path.stem
            if stem.lower() in (n.lower() for n in names) and (path.is_dir() or path.suffix == ".safetensors"):
                return path
    raise api.InvalidParams(f"IP-Adapter preprocessor {preprocessor!r} needs the CLIP {kind} image encoder in "
                            f"{folder}: put {names[0]}.safetensors there (a transformers "
                            f"CLIPVisionModelWithProjection file), or a folder {names[0]}/ with config.json "
                            "and model.safetensors")


def _encoder_config(sd: StateDict) -> dict[str, Any]:
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    hidden = int(patch.shape[0])
    positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    return {"hidden_size": hidden, "patch_size": int(patch.shape[-1]),
            "image_size": int(math.isqrt(positions - 1) * patch.shape[-1]), "num_hidden_layers": layers,
            "intermediate_size": int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "projection_dim": int(sd["visual_projection.weight"].shape[0]),
            "num_attention_heads": {1280: 16, 1664: 16, 1024: 16, 768: 12}.get(hidden, max(1, hidden // 64)),
            "hidden_act": "gelu" if hidden in (1280, 1664) else "quick_gelu"}


def load_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' CLIPVisionModelWithProjection from a folder (config.json) or a single safetensors file
    (config from `<stem>.json` beside it, else inferred: heads 16 for ViT-H/bigG widths, hidden width / 64 otherwise)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    else:
        sd = load_file(str(path))
        if "vision_model.embeddings.patch_embedding.weight" not in sd:
            raise api.InvalidParams(f"{path.name} is not a CLIP vision encoder in transformers' layout "
                                    "(vision_model.*, visual_projection.weight)")
        sidecar = path.with_suffix(".json")  # an optional transformers config beside the file
        config = CLIPVisionConfig.from_json_file(str(sidecar)) if sidecar.is_file() else \
            CLIPVisionConfig(**_encoder_config(sd))
        model = CLIPVisionModelWithProjection(config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise api.InvalidParams(f"CLIP vision encoder {path.name} does not fit its inferred config: missing "
                                    f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def image_processor(encoder: Any) -> Any:
    """CLIP's resize, centre crop and normalisation at the encoder's input size."""
    from transformers import CLIPImageProcessor

    size = int(encoder.config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@dataclass(frozen=True)
class ImageTokens:
    """One unit's image tokens for the prompt's rows and for the negative prompt's rows ([1, tokens, width])."""

    cond: torch.Tensor
    uncond: torch.Tensor


def hidden_states(encoder: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's penultimate hidden states of the pixels and of a black image of their size."""
    with torch.no_grad():
        hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        blank = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return hidden, blank


def image_tokens(sd: StateDict, encoder: Any, pixels: torch.Tensor) -> ImageTokens:
    """The IP-Adapter's image tokens for preprocessed pixels [1, 3, s, s]."""
    with torch.no_grad():
        if is_plus(sd):
            hidden, blank = hidden_states(encoder, pixels)
            return ImageTokens(project_plus(sd, hidden.float()), project_plus(sd, blank.float()))
        embeds = encoder(pixels).image_embeds.float()
        return ImageTokens(project_base(sd, embeds), project_base(sd, torch.zeros_like(embeds)))


def face_tokens(sd: StateDict, embedding: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor] | None,
                shortcut: bool) -> ImageTokens:
    """FaceID tokens for a face embedding [1, 512] (and, for Plus, the crop's and a black crop's hidden states)."""
    face, blank = embedding.float(), torch.zeros_like(embedding, dtype=torch.float32)
    if hidden is None:
        return ImageTokens(project_faceid(sd, face), project_faceid(sd, blank))
    cond, uncond = (h.float() for h in hidden)
    return ImageTokens(project_faceid_plus(sd, face, cond, shortcut), project_faceid_plus(sd, blank, uncond, shortcut))


def layer_weights(sd: StateDict, call: api.CrossAttentionCall, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (to_k_ip, to_v_ip) weights on the query's device and dtype."""
    key = f"ip_adapter.{call.index}.to_k_ip.weight"
    if key not in sd:
        raise api.InvalidParams(f"IP-Adapter {name} has no weights for attention layer {call.index} ({call.name}): "
                                "it was made for another UNet")
    q = call.query
    return sd[key].to(q.device, q.dtype), sd[f"ip_adapter.{call.index}.to_v_ip.weight"].to(q.device, q.dtype)


def decoupled_attention(weights: tuple[torch.Tensor, torch.Tensor], call: api.CrossAttentionCall,
                        tokens: ImageTokens, weight: float) -> torch.Tensor:
    """`weight * attention(q, k_ip, v_ip)` for one cross-attention layer, [rows, tokens, heads * head_dim]."""
    q = call.query
    rows = q.shape[0]
    mark = call.uncond.to(q.device)[:, None, None]
    image = torch.where(mark, tokens.uncond.to(q.device, q.dtype), tokens.cond.to(q.device, q.dtype))
    k, v = F.linear(image, weights[0]), F.linear(image, weights[1])
    k, v = (t.reshape(rows, -1, call.heads, q.shape[-1]).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return weight * out.transpose(1, 2).reshape(rows, -1, call.heads * q.shape[-1])
