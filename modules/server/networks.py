"""A1111's LoRA and embedding routes, answered from the extra-network and embedding hooks."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modules.plugins.networks import fit_embeddings
from modules.server.context import ServerContext


def _describe(spec: Any, n: int | None = None, width: int | None = None) -> dict[str, Any]:
    first = next(iter(spec.vectors.values()), None)
    return {"step": spec.step, "sd_checkpoint": spec.checkpoint, "sd_checkpoint_name": spec.checkpoint_name,
            "shape": width if width is not None else (int(first.shape[-1]) if first is not None else None),
            "vectors": n if n is not None else spec.n_vectors}


def embeddings_listing(app: Any) -> dict[str, dict[str, Any]]:
    """{"loaded": {...}, "skipped": {...}} for the loaded model (everything is "loaded" without one)."""
    model = app.engine.models.current
    if model is None:
        specs = [spec for _, spec in app.plugins.specs("register_embeddings", settings=app.settings)]
        return {"loaded": {s.name: _describe(s) for s in specs}, "skipped": {}}
    fitted = fit_embeddings(app.plugins, app.settings, model)
    loaded = {name: _describe(fitted.specs[name], e.n_vectors, int(e.vectors[0].shape[-1]))
              for name, e in fitted.loaded.items()}
    return {"loaded": loaded, "skipped": {name: _describe(fitted.specs[name]) for name in fitted.skipped}}


def lora_listing(app: Any) -> list[dict[str, Any]]:
    registry = app.registries.extra_networks
    if "lora" not in registry or registry.get("lora").items is None:
        return []
    return [{"name": item.name, "alias": item.alias or item.name, "path": item.path,
             "metadata": dict(item.metadata()) if item.metadata else {}} for item in registry.get("lora").items()]


def add_network_routes(router: APIRouter, ctx: ServerContext, admin: Any = None) -> None:
    """`admin` (a FastAPI dependency) guards refresh-loras: it changes what every user sees."""
    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return lora_listing(ctx.app)

    @router.post("/refresh-loras", dependencies=[admin] if admin is not None else [])
    def refresh_loras() -> None:
        registry = ctx.app.registries.extra_networks
        if "lora" in registry and registry.get("lora").refresh is not None:
            registry.get("lora").refresh()

    @router.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        return embeddings_listing(ctx.app)
