"""The App context: built once from Settings and passed to every front end."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pluggy

from modules.devices import DeviceConfig, device_config
from modules.pipeline.engine import Engine
from modules.plugins.manager import Registries, build_plugin_manager, build_registries
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
    plugins: pluggy.PluginManager
    registries: Registries
    engine: Engine


def build_app(settings: Settings, extra_plugins: tuple = ()) -> App:
    set_offline_environment()
    devices = device_config(settings.device, settings.precision, settings.xformers)
    plugins = build_plugin_manager(extra_plugins)
    registries = build_registries(plugins)
    engine = Engine(settings, registries, devices)
    log.info("device %s, dtype %s, attention %s", devices.device, devices.dtype, devices.attention)
    return App(settings, devices, plugins, registries, engine)
