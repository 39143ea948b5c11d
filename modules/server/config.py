"""Server flags: where to listen, which APIs to serve, who may use them."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from modules.errors import AtelierError

DEFAULT_PORT = 7860
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::")


class StartupRefused(AtelierError):
    """The server was asked to start in an unsafe way."""


@dataclass(frozen=True)
class ServerConfig:
    listen: bool = False
    server_name: str | None = None
    port: int = DEFAULT_PORT
    api: bool = False
    nowebui: bool = False
    api_auth: tuple[tuple[str, str], ...] = ()
    gradio_auth: tuple[tuple[str, str], ...] = ()  # the UI's users; the gate accepts both sets everywhere
    admin_users: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    max_body_mb: int = 100
    max_prompt_chars: int = 65536
    max_queued_per_owner: int = 1000
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback and --server-name; "*": any
    cors_allow_origins: tuple[str, ...] = ()  # other origins that may call and read the API with credentials
    cors_allow_origins_regex: str | None = None
    allow_file_extension_install: bool = False  # file:// URLs for /api/v1/extensions/install
    log_requests: bool = False  # uvicorn's access log, one line per request
    preload_model: bool = True  # load the default checkpoint in the background at start
    devices: str | None = None  # --devices: all, or cuda:0,cuda:1 (one worker each); None: --device alone
    cluster: str | None = None  # --cluster: local, auto or ray://HOST:PORT (docs/cluster.md)

    @property
    def exposed(self) -> bool:
        """True when the server is reachable beyond this machine (--listen, or --server-name elsewhere)."""
        return self.host not in LOOPBACK_NAMES

    @property
    def accepted_hosts(self) -> frozenset[str] | None:
        """Host header names (no port, lower case) the server answers; None: any (see docs/security.md).

        Loopback names always; --server-name; --allowed-hosts on top. --listen (0.0.0.0) without
        --allowed-hosts accepts any name: auth is required there anyway.
        """
        extra = {h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()}
        if "*" in extra or (not extra and self.host in ANY_ADDRESS):
            return None
        names = set(LOOPBACK_NAMES) | extra
        if self.server_name and self.server_name not in ANY_ADDRESS:
            names.add(self.server_name.lower().strip("[]"))
        return frozenset(names)

    @property
    def host(self) -> str:
        """127.0.0.1 unless --listen or --server-name says otherwise."""
        return self.server_name or ("0.0.0.0" if self.listen else "127.0.0.1")

    @property
    def credentials(self) -> tuple[tuple[str, str], ...]:
        """Every user the auth gate accepts: --api-auth and --gradio-auth (and --gradio-auth-path)."""
        return tuple(dict.fromkeys((*self.api_auth, *self.gradio_auth)))

    @property
    def serves_sdapi(self) -> bool:
        return self.api or self.nowebui

    def check_startup(self) -> None:
        """With --listen (or another non-loopback address), refuse to start without auth."""
        if self.cors_allow_origins_regex:
            try:
                re.compile(self.cors_allow_origins_regex)
            except re.error as err:
                raise StartupRefused(f"--cors-allow-origins-regex is not a valid regular expression: {err}") from None
        if self.exposed and not self.credentials and not self.insecure_no_auth:
            raise StartupRefused(f"Refusing to listen on {self.host} without authentication: pass "
                                 "--gradio-auth or --api-auth USER:PASS[,USER:PASS...] (or --gradio-auth-path "
                                 "FILE), or --insecure-no-auth if you really want anyone on the network to "
                                 "use this machine.")

    def banner(self) -> str:
        """The start-up line that says who can reach this server."""
        exposed = self.exposed
        where = f"http://{self.host}:{self.port}"
        if not exposed:
            return f"Atelier on {where} (this machine only)" + (", login required" if self.credentials else "")
        if self.credentials:
            return f"Atelier on {where}: reachable from the network, login required ({len(self.credentials)} users)"
        return (f"WARNING: Atelier on {where} is reachable from the network WITHOUT a login "
                "(--insecure-no-auth): anyone who can reach this machine can use it.")


def parse_api_auth(text: str | None, flag: str = "--api-auth") -> tuple[tuple[str, str], ...]:
    """'user:pass,user2:pass2' -> pairs; a password may contain ':'. Newlines separate entries too."""
    pairs = []
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise AtelierError(f"{flag} entries look like USER:PASS, got {user or item!r}:...")
        pairs.append((user, password))
    return tuple(pairs)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 (needs --api-auth)")
    group.add_argument("--server-name", help="address to bind (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT)
    group.add_argument("--api", action="store_true", help="serve the A1111-compatible API under /sdapi/v1")
    group.add_argument("--nowebui", action="store_true", help="serve the APIs only, without the web UI")
    group.add_argument("--api-auth", help="HTTP Basic credentials USER:PASS[,USER:PASS...] for every route")
    group.add_argument("--gradio-auth", help="web UI logins USER:PASS[,USER:PASS...] (also accepted by the APIs)")
    group.add_argument("--gradio-auth-path", help="file with USER:PASS entries, one per line or comma-separated")
    group.add_argument("--admin-users", default="", help="comma-separated users who may control all jobs")
    group.add_argument("--insecure-no-auth", action="store_true",
                       help="allow --listen without --api-auth (anyone on the network may use it)")
    group.add_argument("--allowed-hosts", default="",
                       help="comma-separated Host names the server answers besides localhost and --server-name "
                            "(a reverse proxy's public name; '*' for any); other Host headers get 400")
    group.add_argument("--cors-allow-origins", default="",
                       help="comma-separated origins (https://app.example) that may call the API from a browser")
    group.add_argument("--cors-allow-origins-regex", default=None,
                       help="a regular expression of further origins that may call the API from a browser")
    group.add_argument("--allow-file-extension-install", action="store_true",
                       help="allow installing extensions from file:// URLs (off: a web page could name a local path)")
    group.add_argument("--api-max-body-mb", type=int, default=100, help="largest request body accepted")
    group.add_argument("--lazy-load", action="store_true",
                       help="do not load the default checkpoint at start; the first job loads it")
    group.add_argument("--log-requests", action="store_true",
                       help="log every HTTP request (off: the log keeps warnings, errors and job failures)")
    group.add_argument("--devices", default=None,
                       help="run one worker per device: all, or a list such as cuda:0,cuda:1 (default: --device)")
    group.add_argument("--cluster", default=None, metavar="local|auto|ray://HOST:PORT",
                       help="run jobs on Ray workers (pip install .[cluster]); see docs/cluster.md")
    group.add_argument("--max-size", type=int, default=4096, help="largest width or height a job may ask for")
    group.add_argument("--max-batch-size", type=int, default=64, help="largest batch_size a job may ask for")
    group.add_argument("--max-n-iter", type=int, default=10000, help="most batches (n_iter) a job may ask for")
    group.add_argument("--max-steps", type=int, default=1000, help="most sampling steps a job may ask for")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        listen=args.listen, server_name=args.server_name, port=args.port, api=args.api, nowebui=args.nowebui,
        api_auth=parse_api_auth(args.api_auth),
        gradio_auth=gradio_auth_from_args(args),
        admin_users=tuple(u.strip() for u in args.admin_users.split(",") if u.strip()),
        insecure_no_auth=args.insecure_no_auth, max_body_mb=args.api_max_body_mb,
        allowed_hosts=_names(getattr(args, "allowed_hosts", "")),
        cors_allow_origins=_names(getattr(args, "cors_allow_origins", "")),
        cors_allow_origins_regex=getattr(args, "cors_allow_origins_regex", None) or None,
        allow_file_extension_install=getattr(args, "allow_file_extension_install", False),
        log_requests=getattr(args, "log_requests", False),
        preload_model=not getattr(args, "lazy_load", False),
        devices=getattr(args, "devices", None), cluster=getattr(args, "cluster", None))


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def gradio_auth_from_args(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """--gradio-auth pairs plus those in --gradio-auth-path (as A1111 reads them)."""
    pairs = parse_api_auth(getattr(args, "gradio_auth", None), "--gradio-auth")
    path = getattr(args, "gradio_auth_path", None)
    if path:
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as err:
            raise AtelierError(f"Cannot read --gradio-auth-path {path}: {err}") from err
        pairs += parse_api_auth(text, "--gradio-auth-path")
    return pairs
