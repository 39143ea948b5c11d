"""The FastAPI app: jobs API, A1111 API, auth around everything; the UI and extensions mount here."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modules.errors import AtelierError, InvalidParams
from modules.jobs.model import Caller, JobNotFound, QueueFull
from modules.server.auth import GateMiddleware, caller_of
from modules.server.context import ServerContext
from modules.server.convert import RequestError
from modules.server.events import EventHub
from modules.server.jobs_api import jobs_router
from modules.server.origin import install_origin_policy
from modules.server.queue_api import queue_router
from modules.server.redact import install_path_redaction
from modules.server.sdapi import sdapi_router

log = logging.getLogger(__name__)
VERSION = "0.1.0"
_EXTENSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# mount_ui(app, context) adds the web UI (Gradio) to the same app; app.state.hub is its job event hub.
MountUI = Callable[[FastAPI, ServerContext], None]


def _lifespan(ctx: ServerContext, hub: EventHub):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.attach()
        await asyncio.to_thread(ctx.start)
        try:
            yield
        finally:
            hub.detach()
            await asyncio.to_thread(ctx.close)

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": err.detail()})

    @app.exception_handler(InvalidParams)
    async def invalid_params(_: Request, err: InvalidParams) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body"], "msg": str(err), "type": "value_error"}]})

    @app.exception_handler(JobNotFound)
    async def not_found(_: Request, err: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(err)})

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, err: QueueFull) -> JSONResponse:
        return JSONResponse(status_code=429, content={"detail": str(err)})

    @app.exception_handler(AtelierError)
    async def atelier_error(_: Request, err: AtelierError) -> JSONResponse:
        return JSONResponse(status_code=500, content={"error": type(err).__name__, "detail": str(err)})


def create_app(ctx: ServerContext, mount_ui: MountUI | None = None) -> FastAPI:
    """The whole HTTP surface for `ctx`. Call `mount_ui` to add the web UI on the same app and port."""
    hub = EventHub(ctx.jobs)  # job events for SSE, /sdapi/v1 waits and the web UI; attached while serving
    app = FastAPI(title="Atelier", version=VERSION, lifespan=_lifespan(ctx, hub),
                  description="A1111-compatible API under /sdapi/v1 and a jobs API under /api/v1/jobs.")
    app.state.context = ctx
    app.state.hub = hub
    admins = ctx.config.admin_users

    def get_caller(request: Request) -> Caller:
        return caller_of(request.scope, admins)

    app.state.get_caller = get_caller
    _error_handlers(app)
    app.include_router(jobs_router(ctx, get_caller))
    app.include_router(queue_router(ctx, get_caller))
    if ctx.config.serves_sdapi:
        app.include_router(sdapi_router(ctx, get_caller))

    @app.get("/api/v1/health", tags=["jobs"])
    def health() -> dict[str, Any]:
        return {"ok": True, "version": VERSION, "queued": ctx.jobs.queue_length(),
                "model": ctx.executor.loaded_model()}

    _mount_extensions(app, ctx, get_caller)
    if mount_ui is not None:
        mount_ui(app, ctx)
    app.add_middleware(GateMiddleware, credentials=ctx.config.credentials,
                       max_body=ctx.config.max_body_mb << 20)
    install_path_redaction(app, ctx.app.settings, ctx.config.exposed)  # model names, not server paths
    install_origin_policy(app, ctx.config)  # outermost: Host names, cross-site changes, CORS
    return app


def _mount_extensions(app: FastAPI, ctx: ServerContext, get_caller: Callable[[Request], Caller]) -> None:
    """The Extensions-tab API under /api/v1/extensions (changes: admins, or anyone without auth) and
    every extension's own routers under /ext/<name>/."""
    from modules.server.extension_routes import root_routes_for_extensions, routes_for_extensions
    from modules.server.extensions_api import a1111_extension_records, extensions_router

    ctx.extension_records = lambda: a1111_extension_records(ctx.app.plugins)

    def may_change(request: Request) -> bool:
        return ctx.may_change_extensions(get_caller(request))

    app.include_router(extensions_router(ctx.app.plugins, ctx.app.settings, ctx.config.host, may_change,
                                         allow_file_install=ctx.config.allow_file_extension_install),
                       prefix="/api/v1", tags=["extensions"])
    mount_extension_routes(app, routes_for_extensions(ctx.app.plugins))
    taken = {getattr(r, "path", "/").split("/")[1] for r in app.routes}
    for prefix, router in root_routes_for_extensions(ctx.app.plugins, taken):
        app.include_router(router, prefix=prefix)  # register_root_api_routes: e.g. /controlnet


def mount_extension_routes(app: FastAPI, routers: Iterable[tuple[str, Any]]) -> list[str]:
    """Mount each extension's FastAPI router under /ext/<name>/; returns the prefixes mounted.

    Auth covers these routes too: the gate middleware wraps the whole app.
    """
    mounted = []
    for name, router in routers:
        if not _EXTENSION_NAME.match(name):
            raise ValueError(f"extension name {name!r} cannot be used in a URL")
        prefix = f"/ext/{name}"
        app.include_router(router, prefix=prefix)
        mounted.append(prefix)
    return mounted


def serve(ctx: ServerContext, mount_ui: MountUI | None = None) -> None:
    """Run the server until interrupted (uvicorn on ctx.config.host:port)."""
    import uvicorn

    ctx.config.check_startup()
    app = create_app(ctx, mount_ui)
    log.warning("%s", ctx.config.banner())
    log.info("A1111 API: %s; web UI: %s", "on" if ctx.config.serves_sdapi else "off",
             "on" if mount_ui is not None else "off")
    uvicorn.run(app, host=ctx.config.host, port=ctx.config.port, log_level="info", timeout_graceful_shutdown=5,
                access_log=ctx.config.log_requests)
