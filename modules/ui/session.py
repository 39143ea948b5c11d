"""Who is using the UI: the logged-in user, else the browser session (a cookie set on first visit).

Every UI job is submitted with that owner, so queue position, progress, previews, results,
Interrupt and Skip are per user (or per browser when there is no login).
"""
from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from http.cookies import SimpleCookie
from typing import Any

from modules.jobs.model import Caller

SESSION_COOKIE = "atelier_session"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def session_owner(token: str) -> str:
    """The owner name of a browser session; the cookie itself (a bearer secret) is never stored."""
    return "session-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _cookie(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header is treated as no cookie
                continue
            morsel = jar.get(SESSION_COOKIE)
            if morsel is not None and _TOKEN.match(morsel.value):
                return morsel.value
    return None


class SessionCookieMiddleware:
    """Give each browser a random session cookie and put it in the request state as `session`."""

    def __init__(self, app, secure: bool = False) -> None:
        self.app = app
        self.secure = secure

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = _cookie(scope.get("headers") or [])
        fresh = token is None
        if fresh:
            token = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["session"] = token
        if not fresh:
            return await self.app(scope, receive, send)
        cookie = f"{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if self.secure else "")

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def request_state(request: Any) -> dict[str, Any]:
    """The ASGI state of a gr.Request (user from the auth gate, session from the cookie)."""
    inner = getattr(request, "request", None) if request is not None else None
    scope = getattr(inner, "scope", None) or {}
    return scope.get("state") or {}


def caller_of_request(request: Any, admin_users: Iterable[str] = ()) -> Caller:
    """The job owner for a UI event: the logged-in user, else this browser's session."""
    state = request_state(request)
    user = state.get("user")
    if user:
        return Caller(owner=user, admin=user in set(admin_users))
    token = state.get("session")
    if not token:  # no cookie reached us (should not happen behind the middleware): a private owner
        token = getattr(request, "session_hash", None) or secrets.token_urlsafe(32)
    return Caller(owner=session_owner(token))
