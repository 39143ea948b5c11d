"""An SD 1.x / SDXL UNet kept alone (ComfyUI-GGUF's `*.gguf` UNets, `models/unet`), completed by
split text encoder and VAE files into the original single-file layout.

The UNet's keys (no `model.diffusion_model.` prefix) gain it; CLIP-L and CLIP-G files in
transformers' layout (ComfyUI's `clip_l.safetensors`, `clip_g.safetensors`) are put under the
SD 1.x / SDXL prefixes, CLIP-G rewritten to the OpenCLIP layout SDXL checkpoints use; an ldm
VAE file goes under `first_stage_model.`. Detection and building then run as for one file.
Missing parts are named before any weights are read.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from modules.checkpoints.convert import vae_source
from modules.checkpoints.flow_arch import transformer_prefix
from modules.checkpoints.gguf_file import inspect_gguf
from modules.checkpoints.keys import SD1_TE, UNET, VAE, XL_TE1, XL_TE2
from modules.checkpoints.load_mmdit import COMPONENT_SUFFIXES, ComponentDirs, find_encoder_file
from modules.checkpoints.packed import PackedTensor
from modules.checkpoints.quantized import read_weights, tensor_family, unet_prefix, unpacked
from modules.errors import CheckpointError

Weights = dict[str, torch.Tensor | PackedTensor]
ENCODERS = {"sd1": (("clip_l", SD1_TE),), "sdxl": (("clip_l", XL_TE1), ("clip_g", XL_TE2))}
_VAE_WORDS = {"sd1": ("vae-ft", "sd15", "sd-v1", "sd1", "kl-f8"), "sdxl": ("sdxl", "sd_xl")}
_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_LABELS = {"sd1": "SD 1.x", "sdxl": "SDXL"}


def _family(sd: Mapping[str, object], path: Path) -> str:
    family = tensor_family(sd)
    if family not in ENCODERS:
        raise CheckpointError(f"{Path(path).name} is a UNet alone of a kind Atelier cannot complete from split "
                              "files (SD 1.x and SDXL UNets can); use a full checkpoint of the model")
    return family


def find_sd_vae(family: str, dirs: ComponentDirs) -> Path | None:
    """A VAE file in the VAE folders whose name says the family (`sdxl_vae.safetensors`, `vae-ft-mse...`)."""
    for folder in dirs.vaes:
        if Path(folder).is_dir():
            for p in sorted(Path(folder).rglob("*")):
                if p.suffix.lower() in COMPONENT_SUFFIXES and any(w in p.name.lower() for w in _VAE_WORDS[family]):
                    return p
    return None


def unet_components(path: Path, sd: Mapping[str, object], *, vae_path: Path | None, dirs: ComponentDirs
                    ) -> tuple[str, dict[str, Path], Path]:
    """(family, text encoder files by kind, VAE file) for a UNet alone; CheckpointError naming what is missing."""
    family = _family(sd, path)
    files = {name: find_encoder_file(name, dirs) for name, _ in ENCODERS[family]}
    vae = Path(vae_path) if vae_path is not None else find_sd_vae(family, dirs)
    missing = [n for n, f in files.items() if f is None]
    needs = []
    if missing:
        needs.append(f"{' and '.join(missing)} text encoder{'s' if len(missing) > 1 else ''} (models/text_encoder)")
    if vae is None:
        example = "sdxl_vae.safetensors" if family == "sdxl" else "vae-ft-mse-840000-ema-pruned.safetensors"
        needs.append(f"a {_LABELS[family]} VAE (models/VAE, e.g. {example})")
    if needs:
        raise CheckpointError(f"{Path(path).name} is an {_LABELS[family]} UNet alone; it needs {' and '.join(needs)}")
    return family, files, vae


def open_clip_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP-G text model in transformers' layout -> the OpenCLIP keys of SDXL checkpoints."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in sd.items():
        k = key.removeprefix("text_model.")
        if k in simple:
            out[simple[k]] = value
        elif k == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif k.startswith("encoder.layers."):
            idx, rest = k[len("encoder.layers."):].split(".", 1)
            part, leaf = rest.rsplit(".", 1)
            block = f"transformer.resblocks.{idx}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, leaf), {})[part[-6]] = value
            elif part in _LAYER_NAMES:
                out[f"{block}{_LAYER_NAMES[part]}.{leaf}"] = value
            else:
                raise CheckpointError(f"Unknown CLIP-G tensor {key}")
        elif not k.endswith("position_ids"):
            raise CheckpointError(f"Unknown CLIP-G tensor {key}")
    for (block, leaf), parts in qkv.items():
        out[f"{block}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _vae_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = unpacked(read_weights(path, dtype), dtype)
    for prefix in (VAE, "vae.", ""):
        source = vae_source(sd, prefix)
        if source and "encoder.down.0.block.0.conv1.weight" in source:
            return source
    raise CheckpointError(f"VAE file {path.name} is not an ldm-layout VAE (encoder.down.* / decoder.up.* keys); "
                          "a UNet alone needs one such as sdxl_vae.safetensors")


def complete_unet(path: Path, sd: Weights, *, dtype: torch.dtype, vae_path: Path | None, dirs: ComponentDirs
                  ) -> tuple[Weights, tuple[str, ...]]:
    """The single-file state dict of a UNet alone plus its split parts, and the parts' file stems."""
    family, files, vae = unet_components(path, sd, vae_path=vae_path, dirs=dirs)
    out: Weights = {UNET + k: v for k, v in sd.items()}
    for name, prefix in ENCODERS[family]:
        state = unpacked(read_weights(files[name], dtype), dtype)
        if name == "clip_g":
            state = open_clip_layout(state)
        else:
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()
                     if not k.startswith("text_projection")}
        out.update({prefix + k: v for k, v in state.items()})
    out.update({VAE + k: v for k, v in _vae_state(vae, dtype).items()})
    return out, (vae.stem, *(files[name].stem for name, _ in ENCODERS[family]))


def preflight_unet(path: Path, *, vae_path: Path | None, dirs: ComponentDirs) -> None:
    """For a GGUF UNet alone, name its missing text encoders / VAE before the loaded model is released."""
    path = Path(path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return
    sd = inspect_gguf(path).tensors
    if transformer_prefix(sd) is None and unet_prefix(sd) == "":
        unet_components(path, sd, vae_path=vae_path, dirs=dirs)
