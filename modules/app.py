"""The App context: built once from Settings and passed to every front end."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from modules.demo import DEMO_CHECKPOINT
from modules.devices import DeviceConfig, device_config
from modules.pipeline.engine import Engine
from modules.plugins.host import PluginHost
from modules.plugins.jobhooks import JobHooks
from modules.plugins.loader import build_plugin_host
from modules.plugins.manager import Registries, build_registries
from modules.settings import Settings

log = logging.getLogger(__name__)


def set_offline_environment() -> None:
    """Never reach a model hub or send analytics."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")


@dataclass
class App:
    settings: Settings
    devices: DeviceConfig
    plugins: PluginHost  # the pluggy manager, extension records, isolated hook calls
    registries: Registries
    engine: Engine


def build_engine(app: App, device: str) -> Engine:
    """Another engine for `device` (its own model cache and memory policy) sharing the app's registries."""
    settings, plugins, registries = app.settings, app.plugins, app.registries
    devices = device_config(device, settings.precision, settings.xformers)
    return Engine(settings, registries, devices, demo_checkpoint=DEMO_CHECKPOINT,
                  hooks_for=lambda task: JobHooks(plugins, registries, settings, task))


def build_app(settings: Settings, extra_plugins: tuple = ()) -> App:
    set_offline_environment()
    devices = device_config(settings.device, settings.precision, settings.xformers)
    plugins = build_plugin_host(settings, extra_plugins, trace=os.environ.get("ATELIER_TRACE_HOOKS") == "1")
    registries = build_registries(plugins, settings)
    engine = Engine(settings, registries, devices, demo_checkpoint=DEMO_CHECKPOINT,
                    hooks_for=lambda task: JobHooks(plugins, registries, settings, task))
    log.info("device %s", devices.describe())
    app = App(settings, devices, plugins, registries, engine)
    for warning in plugins.call("on_app_started", refusals=False, app=app).warnings():
        log.warning(warning)
    return app
