"""Write diffusers / transformers modules as one single-file checkpoint in the original SD 1.x layout.

There is one key mapping, the engine's loader (`modules.checkpoints.convert`, which calls diffusers'
ldm -> diffusers converters). Its inverse is derived by running that converter on a probe state
dict in the original layout (one distinct tensor per key, laid out by the tiny-checkpoint fixture,
the project's writer of the ldm layout) and reading back which source tensor each diffusers key
received. `export_checkpoint` then checks the written file by loading it through the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from modules.checkpoints.detect import SD1_TE, UNET, VAE
from modules.demo.nets import DemoArch, DemoNets

Mapping = dict[str, tuple[str, tuple[int, ...]]]  # diffusers key -> (original key, original shape)


def _invert(probe: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], what: str) -> Mapping:
    """Which probe tensor each converted key holds (converters return views of their input)."""
    by_ptr = {t.data_ptr(): k for k, t in probe.items()}
    out: Mapping = {}
    for key, tensor in converted.items():
        source = by_ptr.get(tensor.data_ptr())
        if source is None:
            raise RuntimeError(f"{what} converter produced {key} from no single source tensor")
        out[key] = (source, tuple(probe[source].shape))
    if len({s for s, _ in out.values()}) != len(probe):
        raise RuntimeError(f"{what} key mapping is not one-to-one")
    return out


def unet_mapping(arch: DemoArch) -> Mapping:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.fixtures.make_tiny_checkpoint import TinyLayout, unet_shapes

    mc = arch.unet_channels[0]
    layout = TinyLayout(4, tuple(c // mc for c in arch.unet_channels), tuple(int(a) for a in arch.unet_attention),
                        arch.unet_layers, False, ("clip_l",))
    shapes = unet_shapes(layout, arch.clip_hidden, None, mc)
    probe = {UNET + k: torch.empty(s) for k, s in shapes.items()}
    return _invert(probe, convert_ldm_unet_checkpoint(probe, arch.unet_config()), "UNet")


def vae_mapping(arch: DemoArch) -> Mapping:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from tests.fixtures.make_tiny_checkpoint import vae_shapes

    ch = arch.vae_channels[0]
    shapes = vae_shapes(ch, tuple(c // ch for c in arch.vae_channels), 4, 1)
    probe = {k: torch.empty(s) for k, s in shapes.items()}
    inverse = _invert(probe, convert_ldm_vae_checkpoint(probe, arch.vae_config()), "VAE")
    return {k: (VAE + src, shape) for k, (src, shape) in inverse.items()}


def original_state_dict(nets: DemoNets, arch: DemoArch, dtype: torch.dtype = torch.float16
                        ) -> dict[str, torch.Tensor]:
    """Every tensor of `nets` under its original SD 1.x key, in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for module, mapping in ((nets.unet, unet_mapping(arch)), (nets.vae, vae_mapping(arch))):
        state = module.state_dict()
        if set(state) != set(mapping):
            raise RuntimeError(f"module keys and mapping differ: {sorted(set(state) ^ set(mapping))[:5]}")
        for key, value in state.items():
            name, shape = mapping[key]
            out[name] = value.detach().reshape(shape)
    for key, value in nets.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):  # `clip_l_keys` reads `...transformer.text_model.*`
            out[SD1_TE + key] = value.detach()
    return {k: v.to("cpu", dtype).contiguous() for k, v in sorted(out.items())}


def checkpoint_metadata(arch: DemoArch, extra: dict) -> dict[str, str]:
    size = f"{arch.image_size}x{arch.image_size}"
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": "Atelier demo (shapes)", "modelspec.resolution": size,
            "modelspec.prediction_type": "epsilon", "modelspec.license": "CC0-1.0",
            "modelspec.description": "A tiny SD 1.x-architecture model trained from scratch on procedural "
                                     "captioned shapes by tools/train_demo_model.py. Not a general model.",
            "atelier.demo": json.dumps({"arch": arch.to_dict(), **extra}, sort_keys=True)}


def export_checkpoint(nets: DemoNets, arch: DemoArch, path: Path, extra: dict | None = None) -> Path:
    """Write `nets` as one fp16 single-file checkpoint; byte-identical for identical weights."""
    from tests.fixtures.make_tiny_checkpoint import save_safetensors_deterministic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_safetensors_deterministic(original_state_dict(nets, arch), tmp, checkpoint_metadata(arch, extra or {}))
    tmp.replace(path)
    return path
