"""Read-only A1111 list and system routes: samplers, models, flags, memory, ..."""
from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from modules.checkpoints.components import module_files
from modules.server.context import ServerContext
from modules.server.networks import add_network_routes

EMPTY_LISTS = ("hypernetworks",)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def cmd_flags(ctx: ServerContext) -> dict[str, Any]:
    """Settings and server flags; credentials are never echoed."""
    flags = {k: _plain(v) for k, v in asdict(ctx.app.settings).items()} if is_dataclass(ctx.app.settings) else {}
    server = asdict(ctx.config)
    server["api_auth"] = "<set>" if ctx.config.api_auth else None
    server["gradio_auth"] = "<set>" if ctx.config.gradio_auth else None
    return {**flags, **{k: _plain(v) for k, v in server.items()}}


def memory(ctx: ServerContext | None = None) -> dict[str, Any]:
    """A1111's `ram` and `cuda` dicts; with a context also `policy`: the memory policy, budget and residents."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    result: dict[str, Any] = {"ram": {"free": free, "used": total - free, "total": total}}
    import torch

    if torch.cuda.is_available():
        free_c, total_c = torch.cuda.mem_get_info()
        result["cuda"] = {"system": {"free": free_c, "used": total_c - free_c, "total": total_c},
                          "active": {"current": torch.cuda.memory_allocated(),
                                     "peak": torch.cuda.max_memory_allocated()}}
    else:
        result["cuda"] = {"error": "CUDA is not available"}
    if ctx is not None:
        from modules.server.memory import memory_report

        result["policy"] = memory_report(ctx)
    return result


def add_list_routes(router: APIRouter, ctx: ServerContext, admin: Any = None) -> None:
    """The read-only lists; `admin` (a FastAPI dependency) guards the refresh routes among them."""
    registries = ctx.app.registries

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in registries.styles]

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {k: str(v) for k, v in s.options.items()}}
                for s in registries.samplers]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                 "default_rho": s.default_rho if s.default_rho is not None else -1,
                 "need_inner_model": s.need_inner_model} for s in registries.schedulers]

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [ctx.describe(info) for info in ctx.checkpoints()]

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": p.name, "filename": str(p)} for p in ctx.app.engine.vaes()]

    @router.get("/sd-modules")
    def sd_modules() -> list[dict[str, Any]]:
        """Forge's list for its VAE / Text Encoder picker: files in models/VAE and models/text_encoder."""
        settings = ctx.app.settings
        return [{"model_name": f.name, "filename": str(f)}
                for _, f in module_files([settings.vae_dir], settings.text_encoder_dirs)]

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": u.name, "model_name": Path(u.model_path).parent.name if u.model_path else None,
                 "model_path": u.model_path, "model_url": None, "scale": u.scale}
                for u in registries.upscalers if u.latent_mode is None]

    @router.get("/realesrgan-models")
    def realesrgan_models() -> list[dict[str, Any]]:
        return [{"name": u.name, "path": u.model_path, "scale": u.scale} for u in registries.upscalers
                if u.model_path and (u.name.startswith("R-ESRGAN") or Path(u.model_path).parent.name == "RealESRGAN")]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": u.name} for u in registries.upscalers if u.latent_mode is not None]

    @router.get("/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        """A1111's {name, cmd_dir}: each restorer whose weights file is installed, with its folder."""
        faces = registries.face_restorers
        found = faces.restorers() if faces is not None else []
        return [{"name": r.name, "cmd_dir": str(r.path.parent)} for r in found if r.path is not None]

    for name in EMPTY_LISTS:  # features that Atelier does not have yet answer with empty lists
        router.add_api_route(f"/{name}", _empty_list, methods=["GET"], name=name)

    add_network_routes(router, ctx, admin)  # loras, refresh-loras, embeddings

    @router.get("/extensions")
    def extensions() -> list[dict[str, Any]]:
        return list(ctx.extension_records())

    @router.get("/cmd-flags")
    def flags() -> dict[str, Any]:
        return cmd_flags(ctx)

    @router.get("/memory")
    def get_memory() -> dict[str, Any]:
        return memory(ctx)


def _empty_list() -> list:
    return []
