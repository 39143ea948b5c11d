"""Load a FLUX.1 / SD3.5 model from one all-in-one file or from split files.

A transformer file may carry its text encoders (`text_encoders.NAME.transformer.*`) and VAE
(`vae.*` / `first_stage_model.*`); whatever it lacks comes from the component folders
(`models/text_encoder`, `models/VAE`) or from an explicit choice. Everything that is missing
is named in one error before any network is built, so a failed load leaves the previous
model untouched.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.checkpoints import bnb4
from modules.checkpoints.families import Family
from modules.checkpoints.gguf_file import inspect_gguf
from modules.checkpoints.gguf_t5 import read_t5_gguf, t5_gguf_shapes
from modules.checkpoints.mmdit import (
    FLOW_ARCHES,
    build_hf_encoder,
    build_transformer,
    build_vae16,
    embedded_vae,
    encoder_state,
    family_for,
    transformer_prefix,
)
from modules.checkpoints.model import ModelSpec, TextEncoderSpec
from modules.checkpoints.quantized import check_bnb, read_weights, unpacked
from modules.checkpoints.read import read_state_dict
from modules.errors import CheckpointError

StateDict = Mapping[str, torch.Tensor]
COMPONENT_SUFFIXES = (".safetensors", ".sft")
GGUF_ENCODER_SUFFIX = ".gguf"  # T5 encoders only (llama.cpp's layout: gguf_t5.py)
ENCODER_SUFFIXES = (*COMPONENT_SUFFIXES, GGUF_ENCODER_SUFFIX)
_ENCODER_WORDS = {"clip_l": ("clip_l", "clip-l"), "clip_g": ("clip_g", "clip-g"),
                  "t5xxl": ("t5xxl", "t5-xxl", "t5_xxl", "t5-v1_1-xxl", "t5_v1_1_xxl")}
_VAE_WORDS = {"flux": ("ae", "flux"), "sd3": ("sd3", "sd35", "sd3.5")}


@dataclass(frozen=True)
class ComponentDirs:
    """Where split text encoders and VAEs live, and the user's explicit choices (name -> file)."""

    text_encoders: tuple[Path, ...] = ()
    vaes: tuple[Path, ...] = ()
    chosen: Mapping[str, Path] = field(default_factory=dict)  # "clip_l" / "clip_g" / "t5xxl" -> file


@dataclass
class FlowParts:
    spec: ModelSpec
    transformer: torch.nn.Module
    vae: torch.nn.Module
    encoders: list[torch.nn.Module]
    modules: tuple[str, ...]  # file stems of the split components used (Forge's "Module N")
    vae_path: Path | None
    t5_source: T5Source | None = None  # where T5 was read from, to read it again after it is freed


def is_flow_checkpoint(sd: StateDict) -> bool:
    return transformer_prefix(sd) is not None


def _files(dirs: tuple[Path, ...], suffixes: tuple[str, ...] = COMPONENT_SUFFIXES) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if Path(d).is_dir():
            out.extend(sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in suffixes))
    return out


def _is_gguf(path: Path) -> bool:
    return Path(path).suffix.lower() == GGUF_ENCODER_SUFFIX


def encoder_kind(filename: str) -> str | None:
    """'clip_l', 'clip_g' or 't5xxl' from a text encoder's file name, None when it says none of them."""
    low = filename.lower()
    return next((kind for kind, words in _ENCODER_WORDS.items() if any(w in low for w in words)), None)


def chosen_encoders(names: tuple[str, ...], dirs: tuple[Path, ...]) -> dict[str, Path]:
    """The user's text encoder choice (file names or stems in `dirs`) keyed by kind; CheckpointError if unknown."""
    files = _files(dirs, ENCODER_SUFFIXES)
    chosen: dict[str, Path] = {}
    for name in names:
        match = next((f for f in files if name in (f.name, f.stem)), None)
        if match is None:
            raise CheckpointError(f"Text encoder {name!r} not found; put it in models/text_encoder")
        kind = encoder_kind(match.name)
        if kind is None:
            raise CheckpointError(f"Text encoder {match.name}: its name must say clip_l, clip_g or t5xxl")
        chosen[kind] = match
    return chosen


def find_encoder_file(name: str, dirs: ComponentDirs) -> Path | None:
    """The user's choice for `name`, else the file named like it (float before fp8 before GGUF); two of the
    preferred kind are ambiguous: a CheckpointError naming both (a silent pick could be the wrong model)."""
    if name in dirs.chosen:
        path = Path(dirs.chosen[name])
        if not path.is_file():
            raise CheckpointError(f"Text encoder file {path} ({name}) not found; put it in models/text_encoder")
        return path
    suffixes = ENCODER_SUFFIXES if name == "t5xxl" else COMPONENT_SUFFIXES
    hits = [p for p in _files(dirs.text_encoders, suffixes) if any(w in p.name.lower() for w in _ENCODER_WORDS[name])]
    tier = lambda p: (_is_gguf(p), "fp8" in p.name.lower())  # noqa: E731  float, fp8, then GGUF
    hits.sort(key=lambda p: (*tier(p), p.name))
    best = [p for p in hits if tier(p) == tier(hits[0])] if hits else []
    if len(best) > 1:
        raise CheckpointError(f"{len(best)} {name} text encoders found in models/text_encoder "
                              f"({', '.join(p.name for p in best)}): choose one in the VAE / Text Encoder picker "
                              f"(forge_additional_modules) or with --text-encoder")
    return hits[0] if hits else None


def find_vae_file(fam: Family, dirs: ComponentDirs) -> Path | None:
    """A VAE named for the family in the VAE folders (`ae.safetensors` for FLUX, `*sd3*` for SD3)."""
    words = _VAE_WORDS[fam.transformer]
    for p in _files(dirs.vaes):
        stem = p.name.lower().split(".")[0]
        if stem in words or any(w in stem for w in words if len(w) > 2):
            return p
    return None


def _missing_message(fam: Family, missing_encoders: list[str], vae_missing: bool) -> str:
    needs = []
    if missing_encoders:
        names = " and ".join(missing_encoders)
        needs.append(f"{names} text encoder{'s' if len(missing_encoders) > 1 else ''} (models/text_encoder)")
    if vae_missing:
        needs.append(f"{fam.vae_hint} (models/VAE)")
    return f"this {fam.label} transformer needs {' and '.join(needs)}"


def _check_widths(fam: Family, tcfg: dict, configs: dict[str, dict], sources: dict[str, str]) -> None:
    t5 = configs["t5xxl"]["d_model"]
    if t5 != tcfg["joint_attention_dim"]:
        raise CheckpointError(f"The T5 text encoder {sources['t5xxl']} is {t5} wide, but this {fam.label} "
                              f"transformer needs a {tcfg['joint_attention_dim']}-wide T5 (T5 v1.1 XXL, "
                              f"e.g. t5xxl_fp16.safetensors)")
    if fam.transformer == "flux":
        pooled = configs["clip_l"]["hidden_size"]
    else:
        pooled = configs["clip_l"]["projection_dim"] + configs["clip_g"]["projection_dim"]
    if pooled != tcfg["pooled_projection_dim"]:
        raise CheckpointError(f"The CLIP text encoders ({', '.join(sources[n] for n in fam.text_encoders[:-1])}) "
                              f"give a {pooled}-wide pooled vector; this {fam.label} transformer needs "
                              f"{tcfg['pooled_projection_dim']}")


def load_flow_parts(path: Path, sd: StateDict, *, device: torch.device, dtype: torch.dtype,
                    vae_dtype: torch.dtype, vae_path: Path | None, dirs: ComponentDirs) -> FlowParts:
    """Build a flow-matching model from `sd` (read from `path`) plus the component files it needs."""
    arch = next(a for a in FLOW_ARCHES if a.matches(sd)).arch
    fam = family_for(arch, path)
    sources: dict[str, dict | Path] = {}
    missing = []
    for name in fam.text_encoders:
        found = encoder_state(sd, name) if name not in dirs.chosen else None
        found = found if found is not None else find_encoder_file(name, dirs)
        if found is None:
            missing.append(name)
        sources[name] = found
    vae_src = Path(vae_path) if vae_path is not None else None
    vae_state = embedded_vae(sd) if vae_src is None else None
    vae_state = unpacked(vae_state, vae_dtype) if vae_state is not None else None
    if vae_src is None and vae_state is None:
        vae_src = find_vae_file(fam, dirs)
    if missing or (vae_src is None and vae_state is None):
        raise CheckpointError(_missing_message(fam, missing, vae_src is None and vae_state is None))
    transformer, tcfg = build_transformer(sd, transformer_prefix(sd) or "", fam, device=device, dtype=dtype)
    encoders, configs, labels, modules = [], {}, {}, []
    for name in fam.text_encoders:
        src = sources[name]
        if isinstance(src, Path):
            labels[name], state = src.name, _encoder_file_weights(src, name, dtype)
            modules.append(src.stem)
        else:
            labels[name], state = f"{name} in {path.name}", src
        if name == "t5xxl":
            t5_source = T5Source.of(src if isinstance(src, Path) else path,
                                    "file" if isinstance(src, Path) else "embedded", fam, dtype)
        model, configs[name] = build_hf_encoder(state, name, fam, device=device, dtype=dtype)
        encoders.append(model)
    _check_widths(fam, tcfg, configs, labels)
    if vae_src is not None:
        vae_state = _vae_file_state(vae_src, dtype)
        modules.insert(0, vae_src.stem)
    vae, vcfg = build_vae16(vae_state, fam, device=device, dtype=vae_dtype)
    configs["t5xxl"] = {**configs["t5xxl"], "hidden_size": configs["t5xxl"]["d_model"]}  # for embedding checks
    specs = tuple(TextEncoderSpec(flavour=n, layer="flow", config=configs[n], pad_with_zero=n == "clip_g",
                                  pooled=n != "t5xxl") for n in fam.text_encoders)
    spec = ModelSpec(arch=fam.name, prediction=fam.prediction, unet_config=tcfg, vae_config=vcfg,
                     text_encoders=specs, vae_scale_factor=fam.latent.scale, family=fam)
    return FlowParts(spec, transformer, vae, encoders, tuple(modules), vae_src, t5_source)


def _encoder_file_weights(path: Path, name: str, dtype: torch.dtype) -> dict:
    """A text encoder file's tensors in transformers' layout (a GGUF T5's blocks stay packed)."""
    if not _is_gguf(path):
        return read_weights(path, dtype=dtype)
    _gguf_t5_only(path, name)
    return read_t5_gguf(path)


def _gguf_t5_only(path: Path, name: str) -> None:
    if name != "t5xxl":
        raise CheckpointError(f"{path.name}: only T5 text encoders are read from GGUF files; use a "
                              f"{name} .safetensors file")


def _vae_file_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from modules.checkpoints.convert import vae_source

    sd = read_state_dict(path, dtype=dtype)
    for prefix in ("vae.", "first_stage_model.", ""):
        source = vae_source(sd, prefix)
        if source:
            return source
    raise CheckpointError(f"VAE file {path} holds no VAE tensors (expected encoder.* / decoder.* keys)")


def _header_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors of the stored shapes (header only; checks truncation);
    a bitsandbytes 4-bit weight has the shape of its quant state, and its scale / state tensors are left out."""
    from modules.checkpoints.read import _check_safetensors_header

    _, header = _check_safetensors_header(Path(path))
    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()
              if k != "__metadata__" and isinstance(v, dict) and "shape" in v}
    four_bit = check_bnb(path) if any(bnb4.MARKER in k for k in header) else {}
    for key in bnb4.aux_keys({w: state["quant_type"] for w, state in four_bit.items()}):
        shapes.pop(key, None)
    return shapes | {w: torch.empty(state["shape"], device="meta") for w, state in four_bit.items()}


def preflight(path: Path, *, vae_path: Path | None, dirs: ComponentDirs) -> None:
    """For a FLUX.1 / SD3.5 safetensors file, the checks that need no weights, run before the current
    model is released: the file and each component are complete, none is missing, T5 is the right width."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (*COMPONENT_SUFFIXES, ".gguf"):
        return
    sd = inspect_gguf(path).tensors if path.suffix.lower() == ".gguf" else _header_shapes(path)
    if not is_flow_checkpoint(sd):
        return
    fam = family_for(next(a for a in FLOW_ARCHES if a.matches(sd)).arch)
    missing, files = [], {}
    for name in fam.text_encoders:
        if name in dirs.chosen or encoder_state(sd, name) is None:
            files[name] = find_encoder_file(name, dirs)
            if files[name] is None:
                missing.append(name)
    vae = Path(vae_path) if vae_path is not None else None
    if vae is None and embedded_vae(sd) is None:
        vae = find_vae_file(fam, dirs)
        if vae is None:
            raise CheckpointError(_missing_message(fam, missing, True))
    if missing:
        raise CheckpointError(_missing_message(fam, missing, False))
    for name, file in files.items():
        if file is not None and _is_gguf(file):
            _gguf_t5_only(file, name)
            _check_t5_width(fam, sd, t5_gguf_shapes(file), file)
    for file in [*(f for f in files.values() if f is not None), *([vae] if vae is not None else [])]:
        if file.suffix.lower() in COMPONENT_SUFFIXES:
            shapes = _header_shapes(file)
            if file in files.values() and "shared.weight" in shapes:
                _check_t5_width(fam, sd, shapes, file)
    t5 = encoder_state(sd, "t5xxl")
    if t5 is not None and "t5xxl" not in files:
        _check_t5_width(fam, sd, t5, path)


def _check_t5_width(fam: Family, sd: StateDict, t5: StateDict, file: Path) -> None:
    prefix = transformer_prefix(sd) or ""
    key = "txt_in.weight" if fam.transformer == "flux" else "context_embedder.weight"
    need, have = int(sd[prefix + key].shape[1]), int(t5["shared.weight"].shape[1])
    if need != have:
        raise CheckpointError(f"The T5 text encoder {file.name} is {have} wide, but this {fam.label} transformer "
                              f"needs a {need}-wide T5 (T5 v1.1 XXL, e.g. t5xxl_fp16.safetensors in models/text_encoder)")


_FOLDER_ENCODERS = {"flux": (("text_encoder", "clip"), ("text_encoder_2", "t5")),
                    "sd3": (("text_encoder", "clip"), ("text_encoder_2", "clip"), ("text_encoder_3", "t5"))}


def flow_folder_family(folder: Path) -> Family | None:
    """The family of a diffusers folder with a FLUX / SD3 `transformer/`, else None."""
    import json

    path = Path(folder) / "transformer" / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"diffusers folder file {path} is unreadable: {err}") from err
    name = cfg.get("_class_name")
    if name == "FluxTransformer2DModel":
        return family_for("flux-dev" if cfg.get("guidance_embeds") else "flux-schnell")
    if name == "SD3Transformer2DModel":
        return family_for("sd35-medium" if cfg.get("dual_attention_layers") else "sd35-large", folder)
    raise CheckpointError(f"diffusers folder {folder} has an unsupported transformer {name!r}")


def load_flow_folder(folder: Path, fam: Family, *, device: torch.device, dtype: torch.dtype,
                     vae_dtype: torch.dtype) -> FlowParts:
    """A FLUX.1 / SD3.5 diffusers folder (transformer/, vae/, text_encoder*/), offline."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    src = str(folder)
    clip_cls = CLIPTextModelWithProjection if fam.transformer == "sd3" else CLIPTextModel
    try:
        tcls = FluxTransformer2DModel if fam.transformer == "flux" else SD3Transformer2DModel
        transformer = tcls.from_pretrained(src, subfolder="transformer", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", local_files_only=True, torch_dtype=vae_dtype)
        encoders = [(clip_cls if kind == "clip" else T5EncoderModel).from_pretrained(
            src, subfolder=sub, local_files_only=True, dtype=dtype) for sub, kind in _FOLDER_ENCODERS[fam.transformer]]
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"diffusers folder {folder} could not be loaded: {str(err)[:300]}") from err
    for m in (transformer, vae, *encoders):
        m.to(device).eval().requires_grad_(False)
    specs = []
    for name, enc in zip(fam.text_encoders, encoders, strict=True):
        cfg = enc.config.to_dict()
        cfg.setdefault("hidden_size", cfg.get("d_model"))
        specs.append(TextEncoderSpec(flavour=name, layer="flow", config=cfg, pad_with_zero=name == "clip_g",
                                     pooled=name != "t5xxl"))
    spec = ModelSpec(arch=fam.name, prediction=fam.prediction, unet_config=dict(transformer.config),
                     vae_config=dict(vae.config), text_encoders=tuple(specs), vae_scale_factor=fam.latent.scale,
                     family=fam)
    t5_folder = Path(folder) / _FOLDER_ENCODERS[fam.transformer][-1][0]
    return FlowParts(spec, transformer, vae, encoders, (), None, T5Source.of(t5_folder, "folder", fam, dtype))


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime) of a file, or summed over a folder's files: a changed file shows."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


@dataclass(frozen=True)
class T5Source:
    """Where a loaded T5 came from: its own file, the all-in-one checkpoint, or a diffusers folder's
    text encoder subfolder; with the precision it was built in and the file's size and time then."""

    path: Path
    kind: str  # "file", "embedded" or "folder"
    family: Family
    dtype: torch.dtype
    stamp: tuple[int, int]

    @classmethod
    def of(cls, path: Path, kind: str, family: Family, dtype: torch.dtype) -> T5Source:
        return cls(Path(path), kind, family, dtype, _stamp(Path(path)))


def t5_source_problem(source: T5Source) -> str | None:
    """Why T5 cannot be read again from `source` (its file is gone or changed since the load), or None."""
    path = source.path
    if not path.exists():
        return (f"The T5 text encoder {path} is gone since the model was loaded, so T5 (freed after encoding) "
                f"cannot be read again: put the file back or load the model again")
    if _stamp(path) != source.stamp:
        return (f"The T5 text encoder {path} changed since the model was loaded, so T5 (freed after encoding) "
                f"is not read from it: load the model again to use the new file")
    return None


def reload_t5(source: T5Source, device: torch.device) -> torch.nn.Module:
    """T5 read again as at load time (same precision, GGUF / fp8 kept packed); CheckpointError naming the
    file when it is gone or has changed since (the model must then be loaded again)."""
    path = source.path
    problem = t5_source_problem(source)
    if problem is not None:
        raise CheckpointError(problem)
    if source.kind == "folder":
        from transformers import T5EncoderModel

        try:
            model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=source.dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"T5 text encoder {path} could not be read again: {str(err)[:300]}") from err
        return model.to(device).eval().requires_grad_(False)
    if source.kind == "file":
        state = _encoder_file_weights(path, "t5xxl", source.dtype)
    else:
        state = encoder_state(read_weights(path, dtype=source.dtype), "t5xxl")
        if state is None:
            raise CheckpointError(f"{path} no longer holds a T5 text encoder: load the model again")
    return build_hf_encoder(state, "t5xxl", source.family, device=device, dtype=source.dtype)[0]
