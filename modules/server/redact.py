"""Under --listen, API clients see model names relative to the models folder, never absolute server paths.

The engine's messages keep their full paths (the log and the local user need them); this ASGI
filter rewrites response bodies at the edge: "/srv/sd/models/Stable-diffusion/x.safetensors is
corrupt" reaches a LAN client as "Stable-diffusion/x.safetensors is corrupt". Text, JSON and
event-stream bodies are rewritten; images and files pass through untouched. The outputs folder
is left alone (A1111's read-only outdir options echo it back).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REWRITTEN_TYPES = (b"application/json", b"text/", b"application/problem+json")


def path_replacements(settings: Any) -> list[tuple[bytes, bytes]]:
    """(absolute path, shown instead) pairs, longest first, each as written, resolved and JSON-escaped."""
    named: dict[str, str] = {}

    def add(path: Path | None, shown: str) -> None:
        if path is None:
            return
        for form in {str(path), str(Path(path).resolve())}:
            if len(form) > 1:
                named.setdefault(form.rstrip("/\\"), shown)

    for folder in (*settings.ckpt_dirs, *settings.lora_dirs, *settings.embeddings_dirs):
        add(folder, Path(folder).name)
    for file in (settings.ckpt, settings.vae_path):
        add(file, Path(file).name if file else "")
    add(settings.data_dir, "data")
    add(settings.models_dir, "models")
    pairs: list[tuple[bytes, bytes]] = []
    for path, shown in sorted(named.items(), key=lambda item: -len(item[0])):
        for sep in ("/", "\\"):  # inside the folder: the relative name
            pairs.append(((path + sep).encode(), b"" if shown == "models" else f"{shown}{sep}".encode()))
        pairs.append((path.encode(), shown.encode()))
        escaped = json.dumps(path)[1:-1]
        if escaped != path:  # Windows paths inside JSON strings
            pairs.append(((escaped + "\\\\").encode(), b"" if shown == "models" else f"{shown}/".encode()))
            pairs.append((escaped.encode(), shown.encode()))
    return pairs


def redact(body: bytes, pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    for path, shown in pairs:
        if path in body:
            body = body.replace(path, shown)
    return body


class PathRedactionMiddleware:
    """Rewrite absolute model and data paths in text responses (see the module docstring)."""

    def __init__(self, app, pairs: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.pairs = pairs

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.pairs:
            return await self.app(scope, receive, send)
        await self.app(scope, receive, _RedactingSend(send, self.pairs))


class _RedactingSend:
    """Buffers a text body with a Content-Length (to fix the length); streams others chunk by chunk."""

    def __init__(self, send, pairs: list[tuple[bytes, bytes]]) -> None:
        self.send, self.pairs = send, pairs
        self.start: dict | None = None
        self.rewrite = False
        self.buffered: list[bytes] | None = None

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            return await self._on_start(message)
        if message["type"] != "http.response.body" or not self.rewrite:
            return await self.send(message)
        body = message.get("body", b"")
        if self.buffered is None:  # streaming: rewrite each chunk
            return await self.send({**message, "body": redact(body, self.pairs)})
        self.buffered.append(body)
        if message.get("more_body", False):
            return None
        return await self._flush(redact(b"".join(self.buffered), self.pairs))

    async def _on_start(self, message: dict) -> None:
        headers = dict((k.lower(), v) for k, v in message.get("headers") or [])
        kind = headers.get(b"content-type", b"")
        self.rewrite = kind.startswith(REWRITTEN_TYPES) and b"content-encoding" not in headers
        if not self.rewrite:
            return await self.send(message)
        if b"content-length" in headers:
            self.start, self.buffered = message, []
            return None
        return await self.send(message)

    async def _flush(self, body: bytes) -> None:
        start = self.start or {}
        headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
        await self.send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


def install_path_redaction(app: Any, settings: Any, exposed: bool) -> None:
    """Add the filter when the server is reachable from the network (--listen, --server-name elsewhere)."""
    if exposed:
        app.add_middleware(PathRedactionMiddleware, pairs=path_replacements(settings))
