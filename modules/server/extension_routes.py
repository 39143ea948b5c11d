"""API routes from extensions: each extension's routers go under /ext/<name>/ and nowhere else.

The server mounts `routes_for_extensions(host)` with `modules.server.app.mount_extension_routes`,
inside the auth gate that covers every route. A router that is
not an `APIRouter`, or holds a route that could land outside its prefix (a Mount, a Host
route, a path with dot segments), is refused and the refusal is recorded on the extension.
"""
from __future__ import annotations

import logging
from typing import Any

from modules.plugins.extensions import NAME_PATTERN
from modules.plugins.host import PluginHost

log = logging.getLogger("atelier.plugins")
HOOK = "register_api_routes"


def extension_prefix(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{name!r} cannot be used in a URL (letters, digits, '-' and '_' only)")
    return f"/ext/{name}"


def router_problem(router: Any, prefix: str) -> str | None:
    """Why `router` may not be mounted at `prefix`, or None when it is safe."""
    from fastapi import APIRouter
    from fastapi.routing import APIRoute, APIWebSocketRoute
    from starlette.routing import Route, WebSocketRoute

    if not isinstance(router, APIRouter):
        return f"returned {type(router).__name__}; only fastapi.APIRouter objects are mounted"
    for route in router.routes:
        if not isinstance(route, (APIRoute, APIWebSocketRoute, Route, WebSocketRoute)):
            return f"route type {type(route).__name__} is not allowed (it could escape {prefix}/)"
        path = getattr(route, "path", "")
        if path and not path.startswith("/"):
            return f"route path {path!r} must start with '/'"
        if any(part in ("..", ".") for part in path.split("/")) or "\\" in path or "//" in path:
            return f"route path {path!r} has dot segments, backslashes or empty segments"
    return None


def routes_for_extensions(host: PluginHost) -> list[tuple[str, Any]]:
    """(extension name, router) pairs to mount at /ext/<name>; bad routers are recorded and skipped."""
    mounted = []
    for plugin, value in host.call(HOOK, refusals=False).results:
        routers = value if isinstance(value, (list, tuple)) else [value]
        try:
            prefix = extension_prefix(plugin)
        except ValueError as err:
            host.record(HOOK, plugin, err)
            continue
        for router in routers:
            problem = router_problem(router, prefix)
            if problem:
                host.record(HOOK, plugin, PermissionError(problem))
                continue
            mounted.append((plugin, router))
    return mounted
