"""Which Host names the server answers, which Origins may change state, and CORS: one ASGI gate.

- DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches the server with its own
  name in the Host header. Only loopback names, --server-name and --allowed-hosts are answered
  (400 otherwise); under --listen without --allowed-hosts any name is (auth is required there).
- Cross-site requests: a state-changing request (POST, PUT, PATCH, DELETE, websocket) whose
  Origin is neither the app's own (the Host header's host:port) nor allowed by
  --cors-allow-origins / --cors-allow-origins-regex is refused with 403, as is
  `Sec-Fetch-Site: cross-site` without an Origin. API clients send no Origin and are unaffected.
- CORS: no other origin may read responses, unless the CORS flags name it. Gradio adds its own
  permissive headers for localhost origins; they are removed here for every origin not allowed.

See docs/security.md.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders

from modules.server.auth import refuse
from modules.server.config import ServerConfig

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
CORS_RESPONSE_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials",
                         "access-control-allow-methods", "access-control-allow-headers",
                         "access-control-expose-headers")


def split_host(value: str) -> tuple[str, str | None]:
    """'Example.com:7860' -> ('example.com', '7860'); '[::1]:80' -> ('::1', '80'); no port: None."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, (rest[1:] or None) if rest.startswith(":") else None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port or None
    return value, None  # a name without a port, or a bare IPv6 address


def same_origin(origin: str, host_header: str) -> bool:
    """Whether `origin` (scheme://host[:port]) names the host:port of the request's Host header."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or not host_header:
        return False
    default = DEFAULT_PORTS.get(scheme.lower(), "")
    name, port = split_host(rest.split("/", 1)[0])
    host_name, host_port = split_host(host_header)
    return bool(name) and (name, port or default) == (host_name, host_port or default)


class OriginPolicyMiddleware:
    """Refuse unknown Host names (400) and cross-site state changes (403); strip CORS headers for
    origins that are not allowed."""

    def __init__(self, app, accepted_hosts: frozenset[str] | None, allow_origins: Iterable[str] = (),
                 allow_origin_regex: str | None = None) -> None:
        self.app = app
        self.accepted_hosts = accepted_hosts
        self.allow_origins = frozenset(o.strip().rstrip("/").lower() for o in allow_origins)
        self.allow_origin_regex = re.compile(allow_origin_regex) if allow_origin_regex else None

    def origin_allowed(self, origin: str) -> bool:
        """Named by --cors-allow-origins or --cors-allow-origins-regex (not the app's own origin)."""
        origin = origin.strip().rstrip("/")
        if origin.lower() in self.allow_origins or "*" in self.allow_origins:
            return True
        return bool(self.allow_origin_regex and self.allow_origin_regex.fullmatch(origin))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.accepted_hosts is not None and split_host(host)[0] not in self.accepted_hosts:
            return await refuse(scope, send, 400, (
                f"This server does not answer to the host name {host!r} (a DNS rebinding guard). Open it as "
                "http://127.0.0.1:PORT, or start it with --allowed-hosts NAME to serve that name."))
        origin = headers.get("origin")
        if self._changes_state(scope) and self._cross_site(origin, host, headers):
            return await refuse(scope, send, 403, (
                f"Cross-site request refused: Origin {origin or '(none, Sec-Fetch-Site: cross-site)'} is not "
                f"this server's own ({host}). To let another web app call this server, start it with "
                "--cors-allow-origins ORIGIN."))
        if origin is not None and scope["type"] == "http" and not self.origin_allowed(origin):
            send = _without_cors_headers(send)
        await self.app(scope, receive, send)

    @staticmethod
    def _changes_state(scope) -> bool:
        return scope["type"] == "websocket" or scope.get("method", "GET").upper() in STATE_CHANGING

    def _cross_site(self, origin: str | None, host: str, headers: Headers) -> bool:
        if origin is None:
            return headers.get("sec-fetch-site", "").lower() == "cross-site"
        return not (same_origin(origin, host) or self.origin_allowed(origin))


def _without_cors_headers(send):
    """`send`, dropping Access-Control-Allow-* from the response start (Gradio's localhost CORS)."""
    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            headers = MutableHeaders(scope=message)
            for name in CORS_RESPONSE_HEADERS:
                del headers[name]
        await send(message)

    return wrapped


def install_origin_policy(app: FastAPI, config: ServerConfig) -> None:
    """Add the CORS middleware (only when the CORS flags name origins) and, outside it, the origin gate."""
    if config.cors_allow_origins or config.cors_allow_origins_regex:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_origin_regex=config.cors_allow_origins_regex, allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(OriginPolicyMiddleware, accepted_hosts=config.accepted_hosts,
                       allow_origins=config.cors_allow_origins,
                       allow_origin_regex=config.cors_allow_origins_regex)
