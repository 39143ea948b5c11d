"""Builds the pluggy manager and the registries that hooks fill."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from modules.faces.service import FaceRestorers
from modules.plugins import hookspecs
from modules.plugins.host import PluginHost
from modules.plugins.registry import NamedRegistry
from modules.plugins.scripts import AxisSpec, ScriptSpec
from modules.plugins.specs import (
    ExtraNetworkSpec,
    PostprocessorSpec,
    SamplerSpec,
    SchedulerSpec,
    StyleSpec,
    UpscalerSpec,
)
from modules.styles import StyleStore

log = logging.getLogger("atelier.plugins")


def build_plugin_manager(extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """Built-in plugins plus `extra_plugins`, without extensions (tests, tools)."""
    from modules.plugins.loader import builtin_plugins

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for plugin in reversed(list(extra_plugins)):
        manager.register(plugin)
    for name, plugin in reversed(builtin_plugins()):
        manager.register(plugin, name=name)
    return manager


@dataclass(frozen=True)
class Registries:
    samplers: NamedRegistry[SamplerSpec]
    schedulers: NamedRegistry[SchedulerSpec]
    styles: StyleStore  # the one part that changes after start-up: styles saved from the UI
    postprocessors: NamedRegistry[PostprocessorSpec]
    upscalers: NamedRegistry[UpscalerSpec]
    extra_networks: NamedRegistry[ExtraNetworkSpec]
    scripts: NamedRegistry[ScriptSpec]  # selectable scripts (X/Y/Z plot, ...)
    xyz_axes: NamedRegistry[AxisSpec]  # the X/Y/Z plot's axes, built-in and from extensions
    face_restorers: FaceRestorers | None = None  # GFPGAN / CodeFormer / RestoreFormer files under models/


def _registry(host: PluginHost, kind: str, hook: str, spec_type: type, **kwargs: Any) -> NamedRegistry:
    """Collect one `register_*` hook; a bad or duplicate spec is skipped and noted on its extension."""
    registry: NamedRegistry = NamedRegistry(kind, ())
    for plugin, spec in host.specs(hook, **kwargs):
        problem = None
        if not isinstance(spec, spec_type):
            problem = f"{hook} returned {type(spec).__name__}, expected {spec_type.__name__}"
        elif spec.name.lower() in registry:
            problem = f"{kind} {spec.name!r} is already registered; the second one is ignored"
        if problem is None:
            registry.add(spec)
            host.owners[(kind, spec.name)] = plugin
            continue
        log.warning("plugin %r: %s", plugin, problem)
        info = host.extension(plugin)
        if info is not None:
            info.warnings.append(problem)
    return registry


def build_registries(plugins: PluginHost | pluggy.PluginManager, settings: Any = None) -> Registries:
    host = plugins if isinstance(plugins, PluginHost) else PluginHost(plugins)
    postprocessors = _registry(host, "post-processor", "register_postprocessors", PostprocessorSpec)
    return Registries(
        samplers=_registry(host, "sampler", "register_samplers", SamplerSpec),
        schedulers=_registry(host, "schedule type", "register_schedulers", SchedulerSpec),
        styles=StyleStore(_registry(host, "style", "register_styles", StyleSpec, settings=settings),
                          getattr(settings, "styles_file", None)),
        postprocessors=NamedRegistry("post-processor", sorted(postprocessors, key=lambda s: s.order)),
        upscalers=_registry(host, "upscaler", "register_upscalers", UpscalerSpec, settings=settings),
        extra_networks=_registry(host, "extra network", "register_extra_networks", ExtraNetworkSpec,
                                  settings=settings),
        scripts=NamedRegistry("script", sorted(_registry(host, "script", "register_scripts", ScriptSpec),
                                               key=lambda s: s.order)),
        xyz_axes=_registry(host, "X/Y/Z axis", "register_xyz_axes", AxisSpec, settings=settings),
        face_restorers=FaceRestorers(getattr(settings, "models_dir", None), getattr(settings, "device", "auto")),
    )
