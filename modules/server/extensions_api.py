"""HTTP routes for the Extensions tab: list, enable/disable (persisted), install from git.
Part of the server: the engine and the plugins never import FastAPI.

The server includes `extensions_router(...)` under its API prefix with its auth
dependencies. Changing extensions runs or stops code, so every change is refused
while the server listens beyond localhost, unless --enable-insecure-extension-access.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from modules.errors import AtelierError, InvalidParams
from modules.plugins.extensions import ExtensionState
from modules.plugins.host import PluginHost
from modules.plugins.install import (
    ExtensionAccessDenied,
    check_install_allowed,
    install_from_git,
    install_requirements,
)


class EnabledBody(BaseModel):
    enabled: bool


class InstallBody(BaseModel):
    url: str
    name: str | None = None


def extensions_router(host: PluginHost, settings: Any, server_host: str | None,
                      may_change: Callable[[Any], bool] | None = None, runner: Any = None,
                      allow_file_install: bool = False):
    """GET /extensions; POST /extensions/{name}/enabled, /extensions/install, /extensions/{name}/requirements.

    `may_change(request)` says whether the caller may change extensions (the server: admins,
    or anyone when auth is off); the localhost rule applies on top of it. file:// installs need
    `allow_file_install` (--allow-file-extension-install).
    """
    router = APIRouter()

    def check_caller(request: Request) -> None:
        if may_change is not None and not may_change(request):
            raise HTTPException(status_code=403, detail="Only admin users may change extensions.")

    def refuse(err: AtelierError) -> HTTPException:
        status = 403 if isinstance(err, ExtensionAccessDenied) else 400 if isinstance(err, InvalidParams) else 500
        return HTTPException(status_code=status, detail=str(err))

    @router.get("/extensions")
    def list_extensions() -> list[dict]:
        return [info.to_dict() for info in host.extensions]

    @router.post("/extensions/{name}/enabled")
    def set_enabled(name: str, body: EnabledBody, request: Request) -> dict:
        check_caller(request)
        if host.extension(name) is None:
            raise HTTPException(status_code=404, detail=f"No extension named {name!r}")
        try:
            check_install_allowed(server_host, settings)
        except AtelierError as err:
            raise refuse(err) from err
        ExtensionState(settings.data_dir).set_enabled(name, body.enabled)
        host.extension(name).enabled = body.enabled
        return {"name": name, "enabled": body.enabled, "restart_required": True}

    @router.post("/extensions/install")
    def install(body: InstallBody, request: Request) -> dict:
        check_caller(request)
        try:
            kwargs = {"runner": runner} if runner else {}
            info = install_from_git(body.url, settings, server_host, body.name,
                                    allow_file=allow_file_install, **kwargs)
        except AtelierError as err:
            raise refuse(err) from err
        return {**info.to_dict(), "restart_required": True}

    @router.post("/extensions/{name}/requirements")
    def requirements(name: str, request: Request) -> dict:
        """pip-install the extension's requirements.txt: only ever on this explicit request."""
        check_caller(request)
        info = host.extension(name)
        if info is None:
            raise HTTPException(status_code=404, detail=f"No extension named {name!r}")
        try:
            kwargs = {"runner": runner} if runner else {}
            output = install_requirements(info, settings, server_host, **kwargs)
        except AtelierError as err:
            raise refuse(err) from err
        return {"name": name, "output": output[-2000:], "restart_required": True}

    return router


def a1111_extension_records(host: PluginHost) -> list[dict]:
    """/sdapi/v1/extensions rows in A1111's shape (git fields are empty: Atelier does not track them)."""
    return [{"name": info.name, "remote": "", "branch": "", "commit_hash": "", "version": info.version,
             "commit_date": 0, "enabled": info.loaded} for info in host.extensions]
