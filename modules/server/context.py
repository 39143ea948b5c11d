"""What the HTTP layer needs, built once: the App, the job manager, the options, the server flags."""
from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from modules.app import App
from modules.checkpoints.model import CheckpointInfo
from modules.checkpoints.quantized import file_weight_format
from modules.errors import AtelierError, CheckpointError
from modules.jobs.executor import Executor
from modules.jobs.manager import JobManager
from modules.jobs.model import Caller
from modules.jobs.overrides import COMPONENT_OPTIONS
from modules.jobs.store import JobStore
from modules.jobs.submit import SubmitService
from modules.server.config import ServerConfig
from modules.server.options import Options, check_components
from modules.server.user_options import UserOptions

log = logging.getLogger(__name__)
_TITLE_HASH = re.compile(r"^(.*?)\s*\[[0-9a-fA-F]{8,64}\]$")


@dataclass
class ServerContext:
    app: App
    config: ServerConfig
    jobs: JobManager
    options: Options
    executor: Executor
    # The plugin host sets this to list extensions for /sdapi/v1/extensions.
    extension_records: Callable[[], list[dict]] = field(default=lambda: [])

    @property
    def data_dir(self) -> Path:
        return self.app.settings.data_dir

    @cached_property
    def submitter(self) -> SubmitService:
        """The one way jobs are queued, for the UI and both APIs alike."""
        return SubmitService(self.jobs, self.app.settings.limits, self.app.registries, self.options_for,
                             self.checkpoint_for_job, self.data_dir / "job-inputs",
                             interrogation=self.app.engine.interrogator.check,
                             check_components=lambda values: check_components(self.app.settings, values))

    @cached_property
    def user_options(self) -> UserOptions:
        """Each user's per-job option defaults, used while logins are on."""
        return UserOptions(self.data_dir / "users")

    def options_for(self, caller: Caller | None) -> dict:
        """The options a caller's jobs start from: the server's, then (under auth) the caller's own."""
        values = self.options.all()
        if caller is None or not self.config.credentials:
            return values
        return {**values, **self.user_options.get(caller.owner)}

    def components(self, values: dict | None = None) -> dict:
        """The server's VAE / text encoder choice (`sd_vae`, `forge_additional_modules`), with `values` on top."""
        merged = {**self.options.all(), **(values or {})}
        return {key: merged.get(key) for key in COMPONENT_OPTIONS}

    def is_admin(self, caller: Caller) -> bool:
        """May change server-wide state (options, models, extensions): anyone without auth, else admins."""
        return not self.config.credentials or caller.admin

    def checkpoint_for_job(self, name: str | None) -> tuple[str, str]:
        """A job's checkpoint (None: the current one) as (name, A1111 title)."""
        info = self.require_checkpoint(name)
        return info.name, self.title(info)

    def may_change_extensions(self, caller: Caller) -> bool:
        """Enabling or installing extensions: anyone without auth, else admin users only
        (the localhost rule of plugins.install applies on top)."""
        return self.is_admin(caller)

    def start(self) -> None:
        """Recover and start the queue; choose the default checkpoint and start loading it on the worker
        in the background, so the page is served at once and the first image does not wait for the load."""
        self.jobs.start()
        from modules.server.memory import start_memory_policy

        start_memory_policy(self)
        current = self.options.get("sd_model_checkpoint")
        if current is None or self.find_checkpoint(current) is None:
            self.options.update({"sd_model_checkpoint": self._default_title()})
        if self.config.preload_model and self.options.get("sd_model_checkpoint"):
            threading.Thread(target=self._preload, args=(self.options.get("sd_model_checkpoint"),),
                             name="atelier-preload", daemon=True).start()

    def _preload(self, title: str) -> None:
        try:
            self.executor.load_model(self.require_checkpoint(title).name, self.components())
        except AtelierError as err:  # the first job reports it again, in its own words
            log.warning("default checkpoint not loaded: %s", " ".join(str(err).split()))
        except RuntimeError as err:  # the worker was shut down while the load was queued
            log.info("default checkpoint not loaded: %s", err)

    def _default_title(self) -> str | None:
        """The engine's choice (a real model before the bundled demo), among the listed checkpoints."""
        found = self.checkpoints()
        try:
            preferred = self.app.engine.default_checkpoint()
        except AtelierError:
            preferred = None
        listed = [i for i in found if preferred and Path(i.path).resolve() == Path(preferred.path).resolve()]
        default = (listed or found or [None])[0]
        return self.title(default) if default else None

    def close(self) -> None:
        self.jobs.close()

    # -- checkpoints ------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        return self.app.engine.checkpoints()

    def _cached_sha256(self, info: CheckpointInfo) -> str | None:
        """Only a hash already computed (on load): listing never reads gigabytes."""
        try:
            cache = json.loads(self.app.settings.hash_cache.read_text(encoding="utf-8"))
            entry = cache.get(str(Path(info.path).resolve()))
            return entry.get("sha256") if isinstance(entry, dict) else None
        except (OSError, ValueError, AttributeError):
            return None

    def title(self, info: CheckpointInfo) -> str:
        """A1111's title: 'name.safetensors [shorthash]' (no hash until the file was hashed)."""
        name = info.name + (Path(info.path).suffix if info.format != "diffusers" else "")
        sha = self._cached_sha256(info)
        return f"{name} [{sha[:10]}]" if sha else name

    def describe(self, info: CheckpointInfo) -> dict:
        sha = self._cached_sha256(info)
        yaml = Path(info.path).with_suffix(".yaml")
        return {"title": self.title(info), "model_name": info.stem, "hash": sha[:10] if sha else None,
                "sha256": sha, "filename": str(info.path), "config": str(yaml) if yaml.exists() else None,
                "weight_dtype": self.weight_format(info)}

    def weight_format(self, info: CheckpointInfo) -> str | None:
        """How a file stores most weights ('Q8_0', 'fp8_e4m3fn', 'fp16'), from its header; None for others."""
        return file_weight_format(Path(info.path)) if info.format != "diffusers" else None

    def find_checkpoint(self, name: str) -> CheckpointInfo | None:
        """By title (with or without ' [hash]'), file name, name or stem; None when unknown."""
        match = _TITLE_HASH.match(name.strip())
        wanted = (match.group(1) if match else name).strip()
        for info in self.checkpoints():
            keys = {info.name, info.stem, info.name + Path(info.path).suffix, Path(info.path).name}
            if wanted in keys or name.strip() == self.title(info):
                return info
        return None

    def require_checkpoint(self, name: str | None) -> CheckpointInfo:
        if name is None:
            name = self.options.get("sd_model_checkpoint")
            if name is None:
                raise CheckpointError(
                    "No checkpoint is available. Put a model in "
                    f"{self.app.settings.models_dir / 'Stable-diffusion'} or start with --ckpt FILE.")
        info = self.find_checkpoint(str(name))
        if info is None:
            raise CheckpointError(f"Checkpoint not found: {name}. See GET /sdapi/v1/sd-models.")
        return info


def _executor(app: App, config: ServerConfig) -> Executor:
    """One device (the default), every listed device (--devices), or Ray workers (--cluster)."""
    from modules.server.executors import local_devices_executor, parse_devices

    devices = parse_devices(config.devices)
    if config.cluster:
        from modules.server.cluster import ray_executor

        return ray_executor(app, config.cluster, devices)
    return local_devices_executor(app, devices)


def build_context(app: App, config: ServerConfig, executor: Executor | None = None) -> ServerContext:
    settings = app.settings
    if executor is None:
        executor = _executor(app, config)
    jobs = JobManager(JobStore(settings.data_dir / "jobs.sqlite3"), executor,
                      max_queued_per_owner=config.max_queued_per_owner)
    return ServerContext(app, config, jobs, Options(settings, settings.data_dir / "config.json",
                                                     legacy_path=settings.data_dir / "options.json"), executor)
