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
ROOT_HOOK = "register_root_api_routes"
# Top-level names Atelier (its API, the web UI, Gradio, the docs) uses or may use: never an extension's.
RESERVED_ROOTS = frozenset({
    "", "api", "sdapi", "ext", "file", "files", "internal", "docs", "redoc", "openapi.json", "static", "assets",
    "gradio_api", "queue", "config", "login", "logout", "theme.css", "info", "upload", "heartbeat", "custom_component",
    "user", "token", "app_id", "startup-events", "reset", "run", "stream", "favicon.ico", "manifest.json",
})


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


def root_prefix_problem(prefix: Any, taken: set[str]) -> str | None:
    """Why `prefix` may not be an extension's top-level prefix, or None."""
    if not isinstance(prefix, str) or not prefix.startswith("/") or not NAME_PATTERN.match(prefix[1:]):
        return f"root prefix {prefix!r} must be '/' and one segment of letters, digits, '-' and '_'"
    name = prefix[1:].lower()
    if name in RESERVED_ROOTS:
        return f"root prefix {prefix!r} is Atelier's own"
    if name in taken:
        return f"root prefix {prefix!r} is already served by another extension or route"
    return None


def root_routes_for_extensions(host: PluginHost, taken: set[str]) -> list[tuple[str, Any]]:
    """(prefix, router) pairs from `register_root_api_routes`; the first claim of a prefix wins,
    Atelier's own prefixes and the first segments in `taken` are refused; refusals are recorded."""
    mounted = []
    taken = {t.lower() for t in taken}
    for plugin, value in host.call(ROOT_HOOK, refusals=False).results:
        for spec in value if isinstance(value, (list, tuple)) else [value]:
            prefix = getattr(spec, "prefix", None)
            problem = root_prefix_problem(prefix, taken) or router_problem(getattr(spec, "router", None), prefix)
            if problem:
                host.record(ROOT_HOOK, plugin, PermissionError(problem))
                continue
            taken.add(prefix[1:].lower())
            mounted.append((prefix, spec.router))
    return mounted
