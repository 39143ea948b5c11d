"""HTTP Basic auth and a body-size limit as one ASGI middleware around the whole app.

Wrapping the ASGI app (rather than adding a dependency per route) covers every route:
/sdapi/v1, /api/v1, /docs, the UI and every extension router mounted later.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Iterable

from modules.jobs.model import Caller

ANONYMOUS = "anonymous"


def check_basic(header: bytes | None, credentials: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The user name if `header` holds valid Basic credentials; every pair is compared in constant time."""
    if not header or not header[:6].lower() == b"basic ":
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    if not sep:
        return None
    found = None
    for known_user, known_password in credentials:  # no early exit: timing does not reveal which matched
        ok = hmac.compare_digest(user, known_user) & hmac.compare_digest(password, known_password)
        if ok and found is None:
            found = known_user
    return found.decode("utf-8") if found is not None else None


def caller_of(scope: dict, admin_users: Iterable[str] = ()) -> Caller:
    user = scope.get("state", {}).get("user") or ANONYMOUS
    return Caller(owner=user, admin=user != ANONYMOUS and user in set(admin_users))


class GateMiddleware:
    """Refuse unauthenticated requests (401) and over-large bodies (413) before any route runs."""

    def __init__(self, app, credentials: Iterable[tuple[str, str]] = (), max_body: int = 100 << 20) -> None:
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        user = None
        if self.credentials:
            user = check_basic(headers.get(b"authorization"), self.credentials)
            if user is None:
                return await refuse(scope, send, 401, "Incorrect username or password.",
                                     [(b"www-authenticate", b'Basic realm="atelier"')])
        scope.setdefault("state", {})["user"] = user
        if scope["type"] == "http":
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await refuse(scope, send, 413, f"Request body larger than {self.max_body} bytes.")
            receive = _limited(receive, self.max_body)
        await self.app(scope, receive, send)


def _limited(receive, max_body: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_body:
                raise BodyTooLarge
        return message

    return wrapped


class BodyTooLarge(Exception):
    """A chunked body went over the limit."""


async def refuse(scope, send, status: int, detail: str, extra_headers: list | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
