"""ControlNet files: finding them, telling their layout and architecture, and building diffusers'
`ControlNetModel` from them with our own key conversion.

Layouts (`LAYOUTS`, checked in order; FLUX.1 ControlNets: see flux.py):
- "original": lllyasviel's `control_model.*` keys (ldm UNet encoder + `input_hint_block`,
  `zero_convs`, `middle_block_out`), converted to diffusers keys by `original_to_diffusers`;
- "diffusers": diffusers' keys, as a single file or a folder with `config.json`.
The architecture family ("sd1", "sd2", "sdxl") comes from the structure: SDXL has the size/pooled
embedding (`label_emb` / `add_embedding`), SD2 linear attention projections, SD1 1x1 conv ones.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modules.plugins import api

from . import adapters, control_lora, flux, ip_adapter

StateDict = Mapping[str, torch.Tensor]
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
FAMILIES = {"sd1": "SD1.5", "sd1-inpaint": "SD1.5", "sd2": "SD2.x", "sd2-v": "SD2.x", "sdxl": "SDXL",
            "flux": "FLUX.1", "flux-dev": "FLUX.1-dev", "flux-schnell": "FLUX.1-schnell", "sd3": "SD3.5",
            "sd35-medium": "SD3.5 Medium", "sd35-large": "SD3.5 Large"}
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def family(arch: str) -> str:
    """"sd1", "sd2", "sdxl", "flux" or "sd3" for a checkpoint architecture ("sd1-inpaint" -> "sd1")."""
    if arch.startswith(("flux", "sd3")):
        return arch[:4] if arch.startswith("flux") else "sd3"
    return {"sd1-inpaint": "sd1", "sd2-v": "sd2"}.get(arch, arch)


# ---------------------------------------------------------------- reading
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or a pickle file read with weights_only=True (never unpickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise api.InvalidParams(f"ControlNet file {path.name} holds no state dict")
    out = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    for group, inner in data.items():  # IP-Adapter .bin files: {"image_proj": {...}, "ip_adapter": {...}}
        if isinstance(inner, Mapping):
            out.update({f"{group}.{k}": v for k, v in inner.items() if isinstance(v, torch.Tensor)})
    return out


def folder_weights(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


# ---------------------------------------------------------------- original -> diffusers keys
def _original_prefix(sd: StateDict) -> str | None:
    for prefix in ("control_model.", ""):
        if f"{prefix}input_hint_block.0.weight" in sd and f"{prefix}zero_convs.0.0.weight" in sd:
            return prefix
    return None


def _indices(sd: StateDict, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in sd
                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})


def _input_block_names(sd: StateDict) -> dict[int, str]:
    """ldm input block index -> the diffusers module it becomes (resnet/attention pair or downsampler)."""
    names, level, j = {}, 0, 0
    for i in _indices(sd, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            names[i] = f"down_blocks.{level}.downsamplers.0"
            level, j = level + 1, 0
        else:
            names[i] = f"down_blocks.{level}.#.{j}"
            j += 1
    return names


def _resnet_key(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def _hint_key(sd: StateDict, rest: str) -> str:
    convs = _indices(sd, "input_hint_block.")
    index, tail = rest.split(".", 1)
    position = convs.index(int(index))
    if position == 0:
        return f"controlnet_cond_embedding.conv_in.{tail}"
    if position == len(convs) - 1:
        return f"controlnet_cond_embedding.conv_out.{tail}"
    return f"controlnet_cond_embedding.blocks.{position - 1}.{tail}"


def _convert_key(sd: StateDict, key: str, blocks: dict[int, str]) -> str:
    head, _, rest = key.partition(".")
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block_out.0": "controlnet_mid_block"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if head == "input_hint_block":
        return _hint_key(sd, rest)
    if head == "zero_convs":
        index, _, tail = rest.partition(".0.")
        return f"controlnet_down_blocks.{index}.{tail}"
    if head == "middle_block":
        index, _, tail = rest.partition(".")
        if index == "1":
            return f"mid_block.attentions.0.{tail}"
        return f"mid_block.resnets.{int(index) // 2}.{_resnet_key(tail)}"
    if head == "input_blocks":
        index, sub, tail = rest.split(".", 2)
        target = blocks[int(index)]
        if target.endswith("downsamplers.0"):
            return f"{target}.conv.{tail.removeprefix('op.')}"
        if sub == "0":
            return f"{target.replace('#', 'resnets')}.{_resnet_key(tail)}"
        return f"{target.replace('#', 'attentions')}.{tail}"
    raise KeyError(key)


def original_to_diffusers(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """lllyasviel's ControlNet keys (after `prefix`) -> diffusers ControlNetModel keys."""
    body = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    blocks = _input_block_names(body)
    out = {}
    for key, value in body.items():
        try:
            out[_convert_key(body, key, blocks)] = value
        except (KeyError, ValueError, IndexError):
            raise api.InvalidParams(f"Unsupported ControlNet layout: unexpected tensor {prefix}{key}") from None
    return out


# ---------------------------------------------------------------- config from diffusers keys
def _depth(sd: StateDict, prefix: str) -> int:
    return len(_indices(sd, prefix + "transformer_blocks."))


def infer_config(sd: StateDict, pooled_dim: int | None = None) -> dict[str, Any]:
    """A diffusers ControlNetModel config from its (diffusers-keyed) tensors."""
    conv_in = sd["conv_in.weight"]
    levels = _indices(sd, "down_blocks.")
    chans = [int(sd[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0]) for b in levels]
    n_res = len(_indices(sd, "down_blocks.0.resnets."))
    depths = [_depth(sd, f"down_blocks.{b}.attentions.0.") for b in levels]
    mid_depth = _depth(sd, "mid_block.attentions.0.")
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    linear = proj_in.ndim == 2
    hint = [int(sd["controlnet_cond_embedding.conv_in.weight"].shape[0])]
    hint += [int(sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
             for i in _indices(sd, "controlnet_cond_embedding.blocks.") if i % 2 == 1]
    layers = [d or mid_depth for d in depths]
    config: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]), "block_out_channels": chans, "layers_per_block": n_res,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "transformer_layers_per_block": layers if len(set(layers)) > 1 else layers[0],
        "cross_attention_dim": int(to_k.shape[1]), "use_linear_projection": linear,
        "attention_head_dim": [max(1, c // 64) for c in chans] if linear else 8,
        "conditioning_channels": int(sd["controlnet_cond_embedding.conv_in.weight"].shape[1]),
        "conditioning_embedding_out_channels": hint,
    }
    if "add_embedding.linear_1.weight" in sd:
        adm_in = int(sd["add_embedding.linear_1.weight"].shape[1])
        pooled = pooled_dim if pooled_dim is not None else 1280
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // 6,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def union_config(sd: StateDict) -> dict[str, Any]:
    """The union/ProMax fields of a ControlNetUnionModel config (8 attention heads, as released)."""
    types, channels = (int(n) for n in sd["task_embedding"].shape)
    return {"num_control_type": types, "num_trans_channel": channels, "num_trans_head": 8,
            "num_trans_layer": len(_indices(sd, "transformer_layes.")),
            "num_proj_channel": int(sd["spatial_ch_projs.weight"].shape[0])}


def arch_of(sd: StateDict) -> str:
    """"sdxl", "sd2" or "sd1" from a diffusers-keyed ControlNet's structure."""
    if "add_embedding.linear_1.weight" in sd:
        return "sdxl"
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    return "sd2" if proj_in is not None and proj_in.ndim == 2 else "sd1"


# ---------------------------------------------------------------- detection table
@dataclass(frozen=True)
class Layout:
    """One control-model file layout: `matches(keys)`, `to_diffusers(state dict)`, the model `kind`
    ("controlnet" or "t2i_adapter") and `arch(diffusers-keyed state) -> family`."""

    name: str
    matches: Callable[[StateDict], bool]
    to_diffusers: Callable[[StateDict], dict[str, torch.Tensor]]
    kind: str = "controlnet"
    arch: Callable[[StateDict], str] = arch_of


def not_supported(what: str) -> Callable[[StateDict], dict[str, torch.Tensor]]:
    """A layout Atelier recognises but cannot run yet: reading it is one clear InvalidParams."""
    def refuse(sd: StateDict) -> dict[str, torch.Tensor]:
        raise api.InvalidParams(f"{what} is not supported yet: Atelier runs ControlNets for SD1.5, SD2.x, "
                                "SDXL and FLUX.1 only")
    return refuse


LAYOUTS = (
    # FLUX.1 ControlNets, all run as diffusers' FluxControlNetModel (flux.py)
    Layout("flux-xlabs", flux.is_xlabs, flux.xlabs_to_diffusers, flux.KIND, lambda sd: "flux"),
    Layout("flux-union", lambda sd: "controlnet_mode_embedder.weight" in sd and "controlnet_x_embedder.weight" in sd,
           dict, flux.KIND, lambda sd: "flux"),
    Layout("flux-instantx", lambda sd: "controlnet_x_embedder.weight" in sd and "controlnet_blocks.0.weight" in sd,
           dict, flux.KIND, lambda sd: "flux"),
    # SD3 ControlNets: recognised, refused until Atelier runs them (a row ready for its loader).
    Layout("sd3", lambda sd: "pos_embed_input.proj.weight" in sd and "controlnet_blocks.0.weight" in sd,
           not_supported("an SD3 ControlNet"), arch=lambda sd: "sd3"),
    Layout("control-lora", control_lora.is_control_lora, dict, "control_lora", control_lora.arch_of),
    Layout("original", lambda sd: _original_prefix(sd) is not None,
           lambda sd: original_to_diffusers(sd, _original_prefix(sd) or "")),
    Layout("union", lambda sd: "task_embedding" in sd and "controlnet_cond_embedding.conv_in.weight" in sd,
           dict, "controlnet_union"),
    Layout("diffusers", lambda sd: "controlnet_cond_embedding.conv_in.weight" in sd and "conv_in.weight" in sd,
           dict),
    Layout("t2i-original", adapters.is_original, adapters.original_to_diffusers, "t2i_adapter", adapters.arch_of),
    Layout("t2i-diffusers", adapters.is_diffusers, dict, "t2i_adapter", adapters.arch_of),
    Layout("ip-adapter-faceid", lambda sd: ip_adapter.is_ip_adapter(sd) and ip_adapter.variant(sd).startswith("faceid"),
           dict, "ip_adapter", ip_adapter.arch_of),
    Layout("ip-adapter", ip_adapter.is_ip_adapter, dict, "ip_adapter", ip_adapter.arch_of),
)


@dataclass
class ControlNetFile:
    """A ControlNet's converted tensors, its layout, family and (folders) its config."""

    path: Path
    layout: str
    arch: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    kind: str = "controlnet"  # or "controlnet_union", "control_lora", "t2i_adapter", "ip_adapter" (whose tensors are used as they are), "flux_controlnet"


def read_controlnet(path: Path) -> ControlNetFile:
    """Read and convert a ControlNet file or diffusers folder; InvalidParams names an unknown layout."""
    config = None
    if path.is_dir():
        weights = folder_weights(path)
        if weights is None or not (path / "config.json").is_file():
            raise api.InvalidParams(f"ControlNet folder {path.name} needs config.json and "
                                    "diffusion_pytorch_model.safetensors")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        sd = read_weights(weights)
    else:
        sd = read_weights(path)
    for layout in LAYOUTS:
        if layout.matches(sd):
            state = layout.to_diffusers(sd)
            return ControlNetFile(path, layout.name, layout.arch(state), state, config, layout.kind)
    sample = ", ".join(sorted(sd)[:3])
    raise api.InvalidParams(f"{path.name} is not a ControlNet Atelier can load (known layouts: "
                            f"{', '.join(x.name for x in LAYOUTS)}; its keys start {sample})")


def build_model(cn: ControlNetFile, pooled_dim: int | None, device: torch.device,
                dtype: torch.dtype, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """diffusers' ControlNetModel (or T2IAdapter) with the file's tensors (built on the meta device, then assigned)."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    if cn.kind == flux.KIND:
        return flux.build(cn.state, cn.config, cn.path.name, device, dtype)
    if cn.kind == "t2i_adapter":
        return adapters.build_adapter(cn.state, cn.config, cn.path.name, device, dtype)
    if cn.kind == "control_lora":  # a ControlNet made from the loaded checkpoint's UNet
        if base is None:
            raise api.InvalidParams(f"Control-LoRA {cn.path.name} needs the loaded checkpoint's UNet")
        state = control_lora.compose(cn.state, base.state_dict(), cn.path.name,
                                     lambda names: original_to_diffusers(names, ""))
        return build_model(ControlNetFile(cn.path, cn.layout, cn.arch, state), pooled_dim, device, dtype)
    config = cn.config if cn.config is not None else infer_config(cn.state, pooled_dim)
    if cn.kind == "controlnet_union" and cn.config is None:
        config.update(union_config(cn.state))
    with torch.device("meta"):
        model = (ControlNetUnionModel if cn.kind == "controlnet_union" else ControlNetModel).from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(cn.state))
    extra = sorted(set(cn.state) - set(expected))
    if missing or extra:
        raise api.InvalidParams(f"ControlNet {cn.path.name} does not fit its detected layout: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in cn.state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- the library
class ControlNetLibrary:
    """ControlNet files under `roots`, by name ("control_v11p_sd15_canny [hash8]" as the extension lists
    them, or the bare stem); converted files and built models are cached per app."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = roots
        self._files: dict[str, Path] | None = None
        self._read: dict[Path, ControlNetFile] = {}
        self._built: dict[tuple, torch.nn.Module] = {}

    def refresh(self) -> None:
        self._files = None

    def files(self) -> dict[str, Path]:
        if self._files is None:
            found: dict[str, Path] = {}
            for root in self.roots:
                if not root.is_dir():
                    continue
                for path in sorted(root.rglob("*")):
                    if path.is_dir() and (path / "config.json").is_file() and folder_weights(path) is not None:
                        found.setdefault(path.name, path)
                    elif path.is_file() and path.suffix in SUFFIXES and not _inside_folder_model(path):
                        found.setdefault(path.stem, path)
            self._files = found
        return self._files

    def names(self) -> list[str]:
        return sorted(self.files(), key=str.lower)

    def find(self, name: str) -> Path | None:
        """A model by stem, by "stem [hash]" as sd-webui-controlnet writes it, or case-insensitively."""
        stem = name.split(" [", 1)[0].strip()
        files = self.files()
        if stem in files:
            return files[stem]
        return next((p for n, p in files.items() if n.lower() == stem.lower()), None)

    def read(self, path: Path) -> ControlNetFile:
        if path not in self._read:
            self._read[path] = read_controlnet(path)
        return self._read[path]

    def models(self, paths: list[Path], pooled_dim: int | None, device: torch.device,
               dtype: torch.dtype, base: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The job's models, all kept (a job may use several ControlNets); Control-LoRAs are built from
        `base` (the loaded UNet) and kept per base."""
        def key_of(path: Path) -> tuple:
            own = id(base) if self.read(path).kind == "control_lora" else None
            return (path, pooled_dim, str(device), dtype, own)

        wanted = {key_of(p) for p in paths}
        for key in list(self._built):
            if key not in wanted:
                del self._built[key]
        out = []
        for path in paths:
            key = key_of(path)
            if key not in self._built:
                self._built[key] = build_model(self.read(path), pooled_dim, device, dtype, base)
            out.append(self._built[key])
        return out


def _inside_folder_model(path: Path) -> bool:
    return (path.parent / "config.json").is_file() and path.name.startswith("diffusion_pytorch_model")
