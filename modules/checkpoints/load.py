"""Load a checkpoint (single file or diffusers folder) into ready-to-run modules."""
from __future__ import annotations

from pathlib import Path

import torch

from modules.checkpoints.convert import build_text_encoder, build_unet, build_vae, vae_source
from modules.checkpoints.detect import (
    ARCH_TABLE,
    VAE,
    detect_diffusers_spec,
    detect_model_spec,
    infer_vae_config,
)
from modules.checkpoints.discover import model_hash, yaml_beside_checkpoint
from modules.checkpoints.keys import UNET
from modules.checkpoints.load_mmdit import (
    ComponentDirs,
    flow_folder_family,
    is_flow_checkpoint,
    load_flow_folder,
    load_flow_parts,
)
from modules.checkpoints.load_unet import complete_unet
from modules.checkpoints.model import CheckpointInfo, LoadedModel, ModelSpec
from modules.checkpoints.packed import store_as_fp8
from modules.checkpoints.quantized import read_weights, require_fp8, unet_prefix, unpacked, weight_format
from modules.checkpoints.read import SAFETENSORS_SUFFIXES, read_safetensors_metadata, read_state_dict
from modules.errors import CheckpointError

_DIFFUSERS_VAE_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.")


def load_vae_file(path: Path, spec: ModelSpec, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A VAE from a separate file: ldm keys (with or without `first_stage_model.`) or diffusers keys."""
    sd = read_state_dict(path)
    if any(k.startswith(_DIFFUSERS_VAE_MARKERS) for k in sd):
        source = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                  "post_quant_conv."))}
        return build_vae(source, spec.vae_config, device=device, dtype=dtype, diffusers_keys=True)
    prefix = VAE if any(k.startswith(VAE) for k in sd) else ""
    source = vae_source(sd, prefix)
    if not source:
        raise CheckpointError(f"VAE file {path} holds no VAE tensors (expected encoder.* / decoder.* keys)")
    config = {**spec.vae_config, **infer_vae_config(source, prefix="")}
    return build_vae(source, config, device=device, dtype=dtype)


def _load_single_file(info: CheckpointInfo, device: torch.device, dtype: torch.dtype, yaml_path: Path | None,
                      force_v: bool, vae_path: Path | None, vae_dtype: torch.dtype, channels_last_vae: bool,
                      components: ComponentDirs | None = None) -> tuple:
    nhwc = (VAE,) if channels_last_vae and vae_path is None else ()
    sd = read_weights(info.path, dtype=dtype, channels_last=nhwc)  # converted while read: no second full copy
    metadata = read_safetensors_metadata(info.path) if info.path.suffix.lower() in SAFETENSORS_SUFFIXES else None
    if is_flow_checkpoint(sd):  # FLUX.1 / SD3.5: components may come from their own folders
        parts = load_flow_parts(info.path, sd, device=device, dtype=dtype, vae_dtype=vae_dtype, vae_path=vae_path,
                                dirs=components or ComponentDirs())
        return parts.spec, parts.transformer, parts.vae, parts.encoders, parts.modules, parts.t5_source
    modules: tuple[str, ...] = ()
    if unet_prefix(sd) == "":  # a UNet alone (ComfyUI-GGUF's SD1 / SDXL files): add the split parts
        sd, modules = complete_unet(info.path, sd, dtype=dtype, vae_path=vae_path, dirs=components or ComponentDirs())
        vae_path = None  # now inside `sd`
    sd = {**unpacked({k: v for k, v in sd.items() if not k.startswith(UNET)}, dtype),
          **{k: v for k, v in sd.items() if k.startswith(UNET)}}  # only the UNet stays packed
    spec = detect_model_spec(sd, yaml_path=yaml_path, force_v=force_v, metadata=metadata)
    arch = next(a for a in ARCH_TABLE if a.arch == spec.arch.replace("sd2-v", "sd2"))
    unet = build_unet(sd, spec.unet_config, device=device, dtype=dtype)
    if vae_path is not None:
        vae = load_vae_file(vae_path, spec, device=device, dtype=vae_dtype)
    else:
        vae = build_vae(vae_source(sd, VAE), spec.vae_config, device=device, dtype=vae_dtype)
    encoders = [build_text_encoder(sd, te, prefix, device=device, dtype=dtype)
                for te, (prefix, *_rest) in zip(spec.text_encoders, arch.encoders, strict=True)]
    return spec, unet, vae, encoders, modules, None


def _load_diffusers(info: CheckpointInfo, device: torch.device, dtype: torch.dtype,
                    force_v: bool, vae_dtype: torch.dtype) -> tuple[ModelSpec, torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = detect_diffusers_spec(info.path, force_v=force_v)
    folder = str(info.path)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                    torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, torch_dtype=vae_dtype)
        encoders = []
        for i, te in enumerate(spec.text_encoders):
            cls = CLIPTextModelWithProjection if te.pooled else CLIPTextModel
            sub = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            encoders.append(cls.from_pretrained(folder, subfolder=sub, local_files_only=True, dtype=dtype))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"diffusers folder {info.path} could not be loaded: {str(err)[:300]}") from err
    modules = [unet, vae, *encoders]
    for m in modules:
        m.to(device).eval().requires_grad_(False)
    return spec, unet, vae, encoders


def load_checkpoint(info: CheckpointInfo, *, device: torch.device | str, dtype: torch.dtype,
                    vae_path: Path | None = None, yaml_path: Path | None = None, force_v: bool = False,
                    hash_cache: Path | None = None, vae_dtype: torch.dtype | None = None,
                    channels_last_vae: bool = False, components: ComponentDirs | None = None,
                    weights: str = "auto") -> LoadedModel:
    """Build the UNet, VAE and text encoders of `info` on `device` in `dtype` (the VAE in `vae_dtype`, default `dtype`).

    `yaml_path` defaults to `NAME.yaml` beside a single-file checkpoint. `vae_path` replaces the
    checkpoint's own VAE. `channels_last_vae` reads a single file's VAE convolution weights straight
    into NHWC (a hint: other VAEs keep NCHW). `components` tells where a FLUX.1 / SD3.5 transformer
    file finds the text encoders and VAE it lacks. `weights="fp8"` keeps a float UNet / transformer's
    weights as float8 (A1111's "FP8 weight"); GGUF and fp8 files stay packed either way. Raises CheckpointError / UnsafeCheckpointError with a
    user-facing message.
    """
    device = torch.device(device)
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    path = Path(info.path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}")
    family = flow_folder_family(path) if info.format == "diffusers" else None
    if family is not None:  # a FLUX.1 / SD3.5 diffusers folder
        parts = load_flow_folder(path, family, device=device, dtype=dtype, vae_dtype=vae_dtype)
        spec, unet, vae, encoders, modules = parts.spec, parts.transformer, parts.vae, parts.encoders, ()
        t5_source = parts.t5_source
        short_hash = ""
    elif info.format == "diffusers":
        spec, unet, vae, encoders = _load_diffusers(info, device, dtype, force_v, vae_dtype)
        modules, t5_source = (), None
        short_hash = ""
    else:
        yaml_path = yaml_path if yaml_path is not None else yaml_beside_checkpoint(path)
        vae_path = Path(vae_path) if vae_path is not None else None
        spec, unet, vae, encoders, modules, t5_source = _load_single_file(
            info, device, dtype, yaml_path, force_v, vae_path, vae_dtype, channels_last_vae, components)
        short_hash = model_hash(path, hash_cache)
    fp8_weight = _store_fp8(unet, spec, weights, dtype, info.name)
    vae_name = vae_hash = None
    if vae_path is not None:
        if info.format == "diffusers":
            vae = load_vae_file(Path(vae_path), spec, device=device, dtype=vae_dtype)
        vae_name, vae_hash = Path(vae_path).name, model_hash(Path(vae_path), hash_cache)
    return LoadedModel(info=info, spec=spec, model_hash=short_hash, unet=unet, vae=vae,
                       text_encoders=encoders, device=device, dtype=dtype, vae_name=vae_name, vae_hash=vae_hash,
                       modules=modules, weight_dtype=weight_format(unet),
                       fp8_weight=fp8_weight, t5_source=t5_source)


FP8_WEIGHT_LABELS = {"fp8": "Enable", "fp8-sdxl": "Enable for SDXL"}  # A1111's fp8_storage values


def _store_fp8(unet: torch.nn.Module, spec: ModelSpec, weights: str, dtype: torch.dtype, name: str) -> str | None:
    """A1111's "FP8 weight": float UNet / transformer weights kept as fp8 ("fp8", or "fp8-sdxl" for SDXL
    only); returns the infotext value when applied. Packed (GGUF, fp8) files are left as they are."""
    if weights not in FP8_WEIGHT_LABELS or (weights == "fp8-sdxl" and not spec.is_sdxl):
        return None
    if weight_format(unet) not in ("fp32", "fp16", "bf16"):
        return None
    require_fp8(name)
    store_as_fp8(unet, dtype)
    return FP8_WEIGHT_LABELS[weights]


def import_model_classes() -> None:
    """Import the model classes now, in the calling thread. diffusers' lazy first import is not
    thread-safe ("cannot import name 'UNet2DConditionModel'"), and the workers of one process
    (--devices) may build their first models at the same moment."""
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401
