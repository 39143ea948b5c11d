"""Run the real server in-process on a free 127.0.0.1 port, for HTTP tests."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    port: int
    context: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def models_dir_with(tmp_path: Path, checkpoints: dict[str, Path]) -> Path:
    """A models folder holding copies of the given checkpoints under Stable-diffusion/."""
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        shutil.copy(path, folder / f"{name}.safetensors")
    return folder.parent


def start_server(tmp_path: Path, checkpoints: dict[str, Path] | None = None, **config) -> RunningServer:
    import uvicorn

    from modules.app import build_app
    from modules.server.app import create_app
    from modules.server.config import ServerConfig
    from modules.server.context import build_context
    from modules.settings import Settings

    models = models_dir_with(tmp_path, checkpoints or {})
    limits = {name: config.pop(name) for name in ("max_batch_size", "max_n_iter", "max_steps") if name in config}
    settings = Settings(models_dir=models, outputs_dir=tmp_path / "outputs", data_dir=tmp_path / "data",
                        device="cpu", precision="fp32", max_size=config.pop("max_size", 1024), **limits,
                        **config.pop("settings", {}))
    port = free_port()
    server_config = ServerConfig(port=port, api=True, nowebui=True, **config)
    ctx = build_context(build_app(settings), server_config)
    app = create_app(ctx)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return RunningServer(url, port, ctx, server, thread)


def wait_for(url: str, timeout: float = 60.0, **kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2, **kwargs)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(url)
