"""The user's choice of VAE and text encoder files: A1111's `sd_vae` and Forge's "VAE / Text Encoder"
picker (`forge_additional_modules`).

A choice names files by file name, stem, path relative to its folder, or a path inside one of the
component folders (models/VAE, models/text_encoder); nothing outside those folders is ever read.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.checkpoints.discover import find_vaes
from modules.checkpoints.gguf_t5 import gguf_encoder_kind
from modules.checkpoints.load_mmdit import COMPONENT_SUFFIXES, ENCODER_SUFFIXES, encoder_kind
from modules.errors import CheckpointError

SD_VAE_SPECIAL = ("Automatic", "None")


@dataclass(frozen=True)
class ComponentChoice:
    """One job's (or the server's) choice: `sd_vae` for SD1/SD2/SDXL, `modules` for every model."""

    sd_vae: str = "Automatic"
    modules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"sd_vae": self.sd_vae, "forge_additional_modules": list(self.modules)}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ComponentChoice:
        """From A1111 / Forge option values (`sd_vae`, `forge_additional_modules`); raises CheckpointError."""
        sd_vae = options.get("sd_vae") or "Automatic"
        modules = options.get("forge_additional_modules") or ()
        if not isinstance(sd_vae, str):
            raise CheckpointError(f"sd_vae must be a VAE file name, Automatic or None, got {sd_vae!r}")
        if isinstance(modules, str):
            modules = [modules]
        if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
            raise CheckpointError(f"forge_additional_modules must be a list of file names, got {modules!r}")
        return cls(sd_vae, tuple(m for m in modules if m.strip()))


@dataclass(frozen=True)
class PickedModules:
    vae: Path | None
    encoders: dict[str, Path]  # "clip_l" / "clip_g" / "t5xxl" -> file


def component_files(dirs: Iterable[Path], suffixes: tuple[str, ...] = COMPONENT_SUFFIXES) -> list[tuple[Path, Path]]:
    """(folder, file) for every .safetensors / .sft file (or `suffixes`) under `dirs`, sorted per folder."""
    out = []
    for folder in dirs:
        folder = Path(folder)
        if folder.is_dir():
            out.extend((folder, p) for p in sorted(folder.rglob("*"))
                       if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
    return out


def module_files(vae_dirs: Iterable[Path], encoder_dirs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """The picker's files: VAEs (.safetensors / .sft), then text encoders (also GGUF T5 encoders)."""
    return [*component_files(vae_dirs), *component_files(encoder_dirs, ENCODER_SUFFIXES)]


def _match(entry: str, files: list[tuple[Path, Path]]) -> Path | None:
    path = Path(entry)
    if path.is_absolute():
        resolved = path.resolve()
        return next((f for _, f in files if f.resolve() == resolved), None)
    rel = path.as_posix()
    return next((f for folder, f in files if rel in (f.name, f.stem, f.relative_to(folder).as_posix())), None)


def _encoder_kind_of(file: Path) -> str:
    if file.suffix.lower() == ".gguf":  # a GGUF is only ever a T5 encoder here; anything else is named
        return gguf_encoder_kind(file)
    kind = encoder_kind(file.name) or _kind_from_header(file)
    if kind is None:
        raise CheckpointError(f"Text encoder {file.name}: cannot tell whether it is clip_l, clip_g or t5xxl; "
                              "rename it to say which (e.g. clip_l.safetensors)")
    return kind


def _kind_from_header(file: Path) -> str | None:
    """t5xxl by its keys; clip_l / clip_g by their real widths (768 / 1280)."""
    from modules.checkpoints.load_mmdit import _header_shapes

    shapes = _header_shapes(file)
    if any(k.endswith("shared.weight") or ".block.0.layer.0." in k for k in shapes):
        return "t5xxl"
    width = next((int(v.shape[0]) for k, v in shapes.items() if k.endswith("final_layer_norm.weight")), None)
    return {768: "clip_l", 1280: "clip_g"}.get(width)


def pick_modules(modules: Iterable[str], vae_dirs: Iterable[Path], encoder_dirs: Iterable[Path]) -> PickedModules:
    """Split the picker's entries into one VAE and text encoders by kind; CheckpointError names a bad entry."""
    vae_files, encoder_files = component_files(vae_dirs), component_files(encoder_dirs, ENCODER_SUFFIXES)
    vae, encoders = None, {}
    for entry in modules:
        found = _match(entry, vae_files)
        if found is not None:
            if vae is not None and vae != found:
                raise CheckpointError(f"Choose one VAE, not {vae.name} and {found.name}")
            vae = found
            continue
        found = _match(entry, encoder_files)
        if found is None:
            raise CheckpointError(f"VAE / text encoder {entry!r} not found; put it in models/VAE (a VAE) or "
                                  "models/text_encoder (clip_l, clip_g, t5xxl) and refresh the list")
        kind = _encoder_kind_of(found)
        if kind in encoders and encoders[kind] != found:
            raise CheckpointError(f"Choose one {kind} text encoder, not {encoders[kind].name} and {found.name}")
        encoders[kind] = found
    return PickedModules(vae, encoders)


def find_sd_vae(choice: str, vae_dir: Path) -> Path | None:
    """The file `sd_vae` names (None for Automatic / None); CheckpointError when it is not in `vae_dir`."""
    if choice in SD_VAE_SPECIAL:
        return None
    path = Path(choice)
    for file in find_vaes(vae_dir):
        if path.is_absolute() and file.resolve() == path.resolve():
            return file
        if choice in (file.name, file.stem, file.relative_to(vae_dir).as_posix()):
            return file
    raise CheckpointError(f"VAE not found: {choice}. Put VAE files in {vae_dir}, or choose Automatic or None.")


def is_flow_file(path: Path) -> bool:
    """True for a FLUX.1 / SD3.5 safetensors file or diffusers folder (headers only; never raises)."""
    from modules.checkpoints.load_mmdit import _header_shapes, is_flow_checkpoint

    path = Path(path)
    if path.is_dir():
        return (path / "transformer" / "config.json").is_file()
    if path.suffix.lower() not in COMPONENT_SUFFIXES or not path.is_file():
        return False
    try:
        return is_flow_checkpoint(_header_shapes(path))
    except CheckpointError:
        return False


def vae_latent_channels(path: Path) -> int | None:
    """A VAE file's latent channels (4: SD1/SD2/SDXL, 16: FLUX.1 / SD3.5) from its header; None if unknown."""
    from modules.checkpoints.load_mmdit import _header_shapes

    if Path(path).suffix.lower() not in COMPONENT_SUFFIXES:
        return None
    try:
        shapes = _header_shapes(Path(path))
    except CheckpointError:
        return None
    conv_in = next((v for k, v in shapes.items() if k.endswith("decoder.conv_in.weight")), None)
    return int(conv_in.shape[1]) if conv_in is not None and conv_in.dim() == 4 else None
