"""Mount the web UI on the server's FastAPI app (same port, same auth gate).

Gradio's file routes serve only its own upload/cache folder (result images are copied there
under content-hash names) and its static files: no output folder, model or data path is
listed in `allowed_paths`, so `/gradio_api/file=` refuses everything else.
"""
from __future__ import annotations

import os

from fastapi import FastAPI

from modules.server.context import ServerContext
from modules.ui.context import UIContext
from modules.ui.create import CSS_PATH, create_ui
from modules.ui.hints import page_script
from modules.ui.session import SessionCookieMiddleware

CACHE_MAX_AGE_S = 24 * 3600


def gradio_cache_dir(ctx: ServerContext) -> str:
    return str((ctx.data_dir / "gradio").resolve())


def mount_webui(app: FastAPI, ctx: ServerContext) -> None:
    """The `mount_ui` callback of `modules.server.app.create_app`."""
    import gradio as gr

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", gradio_cache_dir(ctx))
    blocks = create_ui(UIContext(ctx, hub=app.state.hub))
    blocks.delete_cache = (3600, CACHE_MAX_AGE_S)
    blocks.queue(max_size=1000)
    app.add_middleware(SessionCookieMiddleware)
    gr.mount_gradio_app(
        app, blocks, path="/", footer_links=[], run_history=False, ssr_mode=False, mcp_server=False,
        auth_dependency=_gate_user if ctx.config.credentials else None,
        allowed_paths=[], blocked_paths=[str(ctx.app.settings.models_dir.resolve())],
        css_paths=[CSS_PATH], js=page_script(), server_name=ctx.config.host, server_port=ctx.config.port)


def _gate_user(request) -> str | None:
    """The user the auth gate accepted (the gate already refused everyone else)."""
    return (request.scope.get("state") or {}).get("user")
