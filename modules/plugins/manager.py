"""Builds the pluggy manager and the registries that hooks fill."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from modules.plugins import hookspecs
from modules.plugins.registry import NamedRegistry
from modules.plugins.specs import SamplerSpec, SchedulerSpec, UpscalerSpec


def builtin_plugins() -> list[object]:
    from modules.plugins.builtins import samplers, schedulers, upscalers

    return [samplers, schedulers, upscalers]


def build_plugin_manager(extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for plugin in [*builtin_plugins(), *extra_plugins]:
        manager.register(plugin)
    return manager


@dataclass(frozen=True)
class Registries:
    samplers: NamedRegistry[SamplerSpec]
    schedulers: NamedRegistry[SchedulerSpec]
    upscalers: NamedRegistry[UpscalerSpec]


def _flatten(results: Iterable[list]) -> list:
    # pluggy returns the last-registered plugin first; keep registration order.
    return [spec for result in reversed(list(results)) for spec in result or ()]


def build_registries(manager: pluggy.PluginManager) -> Registries:
    return Registries(
        samplers=NamedRegistry("sampler", _flatten(manager.hook.register_samplers())),
        schedulers=NamedRegistry("schedule type", _flatten(manager.hook.register_schedulers())),
        upscalers=NamedRegistry("upscaler", _flatten(manager.hook.register_upscalers())),
    )
