"""A1111's script listing: /sdapi/v1/scripts and /sdapi/v1/script-info."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modules.plugins.scripts import script_info, script_names
from modules.server.context import ServerContext

TABS = ("txt2img", "img2img")


def add_script_routes(router: APIRouter, ctx: ServerContext) -> None:
    scripts = ctx.app.registries.scripts

    @router.get("/scripts")
    def list_scripts() -> dict[str, list[str]]:
        """Selectable scripts by tab, lower-case as A1111 lists them (script_name matches any case)."""
        return {tab: [name.lower() for name in script_names(scripts, tab)] for tab in TABS}

    @router.get("/script-info")
    def list_script_info() -> list[dict[str, Any]]:
        """Each script once per tab it shows in, with its arguments in positional order."""
        return [script_info(spec, tab, ctx.app.registries) for tab in TABS for spec in scripts if tab in spec.tabs]
