"""Detect a checkpoint's architecture from its keys and shapes, and infer every width.

An ordered table of `ArchSpec`s is tried first to last; the first whose `matches` holds wins
(as ComfyUI's model detection does). Widths come from tensor shapes, never from the file name.

Attention heads cannot be read from weights, so they follow each family's rule: SD1 uses 8 heads
per block; SD2 and SDXL use heads of 64 dims, i.e. `max(1, channels // 64)` heads. For the tiny
test models (32..128 channels) that is 1 or 2 heads of 32..64 dims. diffusers names the head
count `attention_head_dim` for these models (a known naming quirk); we follow its convention.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from modules.checkpoints.flow_arch import FLOW_ARCHES, FlowArch
from modules.checkpoints.keys import SD1_TE, SD2_TE, UNET, VAE, XL_TE1, XL_TE2, StateDict, clip_l_prefix
from modules.checkpoints.keys import has_prefix as _has_prefix
from modules.checkpoints.model import ModelSpec, TextEncoderSpec
from modules.errors import CheckpointError

MARKER_KEYS = ("v_pred", "ztsnr")  # ComfyUI's marker tensors, not weights


def _unet_in_channels(sd: StateDict) -> int:
    w = sd.get(UNET + "input_blocks.0.0.weight")
    return int(w.shape[1]) if w is not None else -1


@dataclass(frozen=True)
class ArchSpec:
    """One entry of the detection table: required key prefixes plus allowed UNet input channels."""

    arch: str
    prefixes: tuple[str, ...]
    in_channels: tuple[int, ...]
    heads_of_64: bool  # SD2 / SDXL head rule; SD1 uses 8 heads
    sample_size: int
    encoders: tuple[tuple[str, str, str, bool], ...]  # (prefix, flavour, layer, pooled)

    def matches(self, sd: StateDict) -> bool:
        return all(_has_prefix(sd, p) for p in self.prefixes) and _unet_in_channels(sd) in self.in_channels


ARCH_TABLE: tuple[ArchSpec | FlowArch, ...] = (
    *FLOW_ARCHES,  # FLUX.1 dev / schnell, SD3.5 Medium / Large (built by load_mmdit.py)
    ArchSpec("sdxl", (UNET + "label_emb.", XL_TE1, XL_TE2), (4, 9), True, 128,
             ((XL_TE1, "clip_l", "penultimate", False), (XL_TE2, "open_clip", "penultimate", True))),
    ArchSpec("sd2", (SD2_TE,), (4, 9), True, 64, ((SD2_TE, "open_clip", "penultimate_norm", False),)),
    ArchSpec("sd1-inpaint", (SD1_TE,), (9,), False, 64, ((SD1_TE, "clip_l", "last", False),)),
    ArchSpec("sd1", (SD1_TE,), (4,), False, 64, ((SD1_TE, "clip_l", "last", False),)),
)


def _describe(sd: StateDict) -> str:
    tops = sorted({".".join(k.split(".")[:2]) for k in sd})[:12]
    return f"in_channels={_unet_in_channels(sd)}, key groups: {', '.join(tops) or 'none'}"


# ---------------------------------------------------------------- UNet

def _sub_indices(sd: StateDict, prefix: str) -> set[int]:
    """The integer N of every key `prefix + N + .rest`."""
    out = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return out


def _unet_levels(sd: StateDict) -> list[list[tuple[int, int]]]:
    """(channels, transformer depth) of every input res block, grouped by resolution level."""
    levels: list[list[tuple[int, int]]] = [[]]
    for i in sorted(_sub_indices(sd, UNET + "input_blocks."))[1:]:
        p = f"{UNET}input_blocks.{i}."
        if p + "0.op.weight" in sd:
            levels.append([])
        elif p + "0.in_layers.2.weight" in sd:
            depth = len(_sub_indices(sd, p + "1.transformer_blocks."))
            levels[-1].append((int(sd[p + "0.in_layers.2.weight"].shape[0]), depth))
        else:
            raise CheckpointError(f"Unsupported UNet layout: input block {i} is neither a res block nor a downsampler")
    return levels


def infer_unet_config(sd: StateDict, heads_of_64: bool, sample_size: int) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config from an ldm UNet's tensors."""
    conv_in = sd[UNET + "input_blocks.0.0.weight"]
    mc = int(conv_in.shape[0])
    levels = _unet_levels(sd)
    n_res = len(levels[0])
    if any(len(lv) != n_res or len(set(lv)) != 1 for lv in levels):
        raise CheckpointError(f"Unsupported UNet layout: uneven levels {levels}")
    chans = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    mid_depth = len(_sub_indices(sd, UNET + "middle_block.1.transformer_blocks."))
    if depths[-1] and mid_depth != depths[-1]:
        raise CheckpointError(f"Unsupported UNet layout: middle depth {mid_depth} != last level {depths[-1]}")
    to_k = next((v for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.startswith(UNET) and k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None or mid_depth == 0:
        raise CheckpointError("Unsupported UNet layout: no cross-attention transformer found")
    layers = [d or mid_depth for d in depths]
    cfg: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(sd[UNET + "out.2.weight"].shape[0]),
        "block_out_channels": chans,
        "layers_per_block": n_res,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "transformer_layers_per_block": layers if len(set(layers)) > 1 else layers[0],
        "cross_attention_dim": int(to_k.shape[1]),
        "attention_head_dim": [max(1, c // 64) for c in chans] if heads_of_64 else 8,
        "use_linear_projection": proj_in.ndim == 2,
    }
    if chans[0] != mc:
        raise CheckpointError(f"Unsupported UNet layout: conv_in width {mc} vs first level {chans[0]}")
    return cfg


def _add_sdxl_embedding(cfg: dict[str, Any], sd: StateDict, pooled_dim: int) -> None:
    adm_in = int(sd[UNET + "label_emb.0.0.weight"].shape[1])
    if (adm_in - pooled_dim) % 6 or adm_in <= pooled_dim:
        raise CheckpointError(f"Unsupported SDXL layout: adm_in {adm_in} does not fit pooled dim {pooled_dim}")
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled_dim) // 6,
               projection_class_embeddings_input_dim=adm_in)


# ---------------------------------------------------------------- VAE

def infer_vae_config(sd: StateDict, prefix: str = VAE) -> dict[str, Any]:
    """A diffusers AutoencoderKL config from ldm VAE tensors under `prefix`."""
    try:
        conv_in = sd[prefix + "encoder.conv_in.weight"]
        ch = int(conv_in.shape[0])
        n_levels = len(_sub_indices(sd, prefix + "encoder.down."))
        mults = [int(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(n_levels)]
        n_res = len(_sub_indices(sd, prefix + "encoder.down.0.block."))
        z = int(sd[prefix + "decoder.conv_in.weight"].shape[1])
        out_ch = int(sd[prefix + "decoder.conv_out.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"Unsupported VAE layout: missing {err.args[0]}") from err
    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n_levels,
        "up_block_types": ["UpDecoderBlock2D"] * n_levels,
        "block_out_channels": [ch * m for m in mults],
        "layers_per_block": n_res,
        "latent_channels": z,
    }


# ---------------------------------------------------------------- CLIP

def infer_clip_config(sd: StateDict, base: str, flavour: str) -> dict[str, Any]:
    """transformers.CLIPTextConfig keyword arguments for one text encoder."""
    if flavour == "clip_l":
        p = clip_l_prefix(sd, base)
        tok = sd[p + "embeddings.token_embedding.weight"]
        pos = sd[p + "embeddings.position_embedding.weight"]
        layers = len(_sub_indices(sd, p + "encoder.layers."))
        inter = int(sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0])
        act, pad, proj = "quick_gelu", 49407, int(tok.shape[1])
    else:
        tok = sd[base + "token_embedding.weight"]
        pos = sd[base + "positional_embedding"]
        layers = len(_sub_indices(sd, base + "transformer.resblocks."))
        inter = int(sd[base + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        act, pad, proj = "gelu", 0, int(sd[base + "text_projection"].shape[1])
    hidden = int(tok.shape[1])
    return {"vocab_size": int(tok.shape[0]), "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": int(pos.shape[0]), "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": proj, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad}


# ---------------------------------------------------------------- prediction type

def yaml_prediction(yaml_path: Path) -> str:
    """'v' or 'eps' from an ldm-style config (`model.params.parameterization`; ldm's default is eps)."""
    try:
        cfg = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8"))
        param = ((cfg or {}).get("model") or {}).get("params", {}).get("parameterization", "eps")
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise CheckpointError(f"Model config {yaml_path} could not be read: {err}") from err
    return "v" if str(param).lower().startswith("v") else "eps"


def marker_prediction(sd: StateDict, metadata: Mapping[str, str] | None) -> str | None:
    """'v' / 'eps' from SAI ModelSpec metadata or ComfyUI's `v_pred` key; None if unmarked."""
    if "v_pred" in sd:
        return "v"
    value = str((metadata or {}).get("modelspec.prediction_type", "")).lower()
    if value.startswith("v"):
        return "v"
    if value.startswith("eps"):
        return "eps"
    return None


def v_heuristic(unet_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                context_dim: int) -> bool:
    """A1111's SD2 test: at t=999 on a constant input, a v model's output sits far below its input.

    `unet_fn(x, t, context)` returns the raw UNet output. True means v-prediction.
    """
    x = torch.full((1, 4, 8, 8), 0.5)
    context = torch.full((1, 2, context_dim), 0.5)
    with torch.no_grad():
        out = unet_fn(x, torch.tensor([999]), context)
    return (out.float() - x).mean().item() < -1


def _probe_sd2_v(sd: StateDict, unet_config: dict[str, Any]) -> bool:
    if unet_config["in_channels"] != 4:
        return False
    from modules.checkpoints.convert import build_unet  # heavy; only for unmarked SD2 checkpoints

    unet = build_unet(sd, unet_config, device=torch.device("cpu"), dtype=torch.float32)
    return v_heuristic(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
                       unet_config["cross_attention_dim"])

def resolve_prediction(arch: str, sd: StateDict, unet_config: dict[str, Any], *, yaml_path: Path | None,
                       force_v: bool, metadata: Mapping[str, str] | None) -> str:
    """yaml override > force_v > metadata / `v_pred` key > A1111's SD2 heuristic > eps."""
    if yaml_path is not None:
        return yaml_prediction(yaml_path)
    if force_v:
        return "v"
    marked = marker_prediction(sd, metadata)
    if marked is not None:
        return marked
    if arch == "sd2" and _probe_sd2_v(sd, unet_config):
        return "v"
    return "eps"


# ---------------------------------------------------------------- entry points

def find_arch(sd: StateDict) -> ArchSpec:
    """The first table entry matching `sd`, or CheckpointError naming what was found."""
    for spec in ARCH_TABLE:
        if spec.matches(sd):
            return spec
    raise CheckpointError(f"Unknown checkpoint architecture ({_describe(sd)}); "
                          f"supported: SD 1.x, SD 1.x inpainting, SD 2.x, SDXL base, FLUX.1 dev / schnell, "
                          f"SD3.5 Medium / Large")


def detect_model_spec(sd: StateDict, *, yaml_path: Path | None = None, force_v: bool = False,
                      metadata: Mapping[str, str] | None = None) -> ModelSpec:
    """The architecture and all widths of a single-file checkpoint's state dict."""
    arch = find_arch(sd)
    if isinstance(arch, FlowArch):
        raise CheckpointError(f"{arch.arch} is a flow-matching transformer: load it with load_checkpoint")
    try:
        encoders = tuple(
            TextEncoderSpec(flavour=flavour, layer=layer, config=infer_clip_config(sd, prefix, flavour),
                            pad_with_zero=flavour == "open_clip", pooled=pooled)
            for prefix, flavour, layer, pooled in arch.encoders)
        unet_cfg = infer_unet_config(sd, arch.heads_of_64, arch.sample_size)
        if arch.arch == "sdxl":
            _add_sdxl_embedding(unet_cfg, sd, encoders[-1].config["projection_dim"])
    except KeyError as err:
        raise CheckpointError(f"Checkpoint looks like {arch.arch} but lacks tensor {err.args[0]}") from err
    vae_cfg = infer_vae_config(sd)
    pred = resolve_prediction(arch.arch, sd, unet_cfg, yaml_path=yaml_path, force_v=force_v, metadata=metadata)
    name = "sd2-v" if arch.arch == "sd2" and pred == "v" else arch.arch
    return _finish_spec(name, pred, unet_cfg, vae_cfg, encoders)


def _finish_spec(arch: str, pred: str, unet_cfg: dict[str, Any], vae_cfg: dict[str, Any],
                 encoders: tuple[TextEncoderSpec, ...]) -> ModelSpec:
    xl = arch == "sdxl"
    scale = 0.13025 if xl else 0.18215
    if arch == "sd2-v":
        unet_cfg = {**unet_cfg, "sample_size": 96, "upcast_attention": True}  # as SD 2.x 768-v ships
    vae_cfg = {**vae_cfg, "scaling_factor": scale, "sample_size": unet_cfg["sample_size"] * 8,
               "force_upcast": xl}
    return ModelSpec(arch=arch, prediction=pred, unet_config=unet_cfg, vae_config=vae_cfg,
                     text_encoders=encoders, vae_scale_factor=scale)


_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
              "down_block_types", "up_block_types", "transformer_layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "upcast_attention")
_VAE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "scaling_factor", "sample_size", "force_upcast")
_CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
              "bos_token_id", "eos_token_id", "pad_token_id")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"diffusers folder file {path} is missing or unreadable: {err}") from err


def _folder_encoder(cfg: dict[str, Any], pooled: bool, xl: bool) -> TextEncoderSpec:
    config = {k: cfg[k] for k in _CLIP_KEYS if k in cfg}
    if config.get("hidden_act") == "quick_gelu":
        return TextEncoderSpec("clip_l", "penultimate" if xl else "last", config)
    if xl:
        return TextEncoderSpec("open_clip", "penultimate", config, pad_with_zero=True, pooled=pooled)
    # diffusers' SD 2.x folders drop OpenCLIP's last layer (ViT-H: 24 -> 23), so their last hidden
    # state is already the penultimate one; a folder keeping every layer (even count) is not cut.
    layer = "last" if config.get("num_hidden_layers", 0) % 2 else "penultimate_norm"
    return TextEncoderSpec("open_clip", layer, config, pad_with_zero=True)


def detect_diffusers_spec(folder: Path, *, force_v: bool = False) -> ModelSpec:
    """The spec of a diffusers folder, read from its component configs."""
    folder = Path(folder)
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    te1 = _read_json(folder / "text_encoder" / "config.json")
    te2_path = folder / "text_encoder_2" / "config.json"
    xl = te2_path.exists()
    encoders = [_folder_encoder(te1, False, xl)]
    if xl:
        encoders.append(_folder_encoder(_read_json(te2_path), True, xl))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.exists() else {}
    pred = "v" if force_v or sched.get("prediction_type") == "v_prediction" else "eps"
    if xl:
        arch = "sdxl"
    elif encoders[0].flavour == "open_clip":
        arch = "sd2-v" if pred == "v" else "sd2"
    else:
        arch = "sd1-inpaint" if unet.get("in_channels") == 9 else "sd1"
    unet_cfg = {k: unet[k] for k in _UNET_KEYS if k in unet}
    vae_cfg = {k: vae[k] for k in _VAE_KEYS if k in vae}
    scale = float(vae.get("scaling_factor", 0.13025 if xl else 0.18215))
    return ModelSpec(arch=arch, prediction=pred, unet_config=unet_cfg, vae_config=vae_cfg,
                     text_encoders=tuple(encoders), vae_scale_factor=scale)
