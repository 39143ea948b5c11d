"""Finds extensions (extensions/<name>/ folders and the `atelier.extensions` entry points),
applies the flags, the allow-list and the persisted choices, checks API versions, imports
them in before/after order and registers them with pluggy. One broken extension never
stops the others: its record says why it is not loaded.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from modules.plugins import hookspecs
from modules.plugins.api import API_VERSION
from modules.plugins.extensions import (
    ExtensionInfo,
    ExtensionState,
    api_compatible,
    info_from_metadata,
    order_extensions,
    read_folder_metadata,
)
from modules.plugins.host import PluginHost

log = logging.getLogger("atelier.plugins")
ENTRY_POINT_GROUP = "atelier.extensions"
# What --disable-extra-extensions keeps: the extensions shipped in the repository's extensions/ folder.
BUNDLED_EXTENSIONS = frozenset({"film-grain", "style-pack", "wildcards", "lora", "xyz-grid", "prompt-matrix",
                                "prompts-from-file", "sd-upscale", "loopback", "outpainting-mk2", "controlnet"})

Loader = Callable[[], object]
# An extension with per-app state defines create_plugin(settings); each app registers what it returns.
PLUGIN_FACTORY = "create_plugin"


def builtin_plugins() -> list[tuple[str, object]]:
    from modules.plugins.builtins import samplers, schedulers, styles, upscalers

    return [("builtin.samplers", samplers), ("builtin.schedulers", schedulers), ("builtin.styles", styles),
            ("builtin.upscalers", upscalers)]


def _import_folder(info: ExtensionInfo) -> ModuleType:
    folder = info.path
    package = (folder / "__init__.py").is_file()
    entry = folder / ("__init__.py" if package else "extension.py")
    if not entry.is_file():
        raise ImportError(f"{folder} has neither extension.py nor __init__.py")
    module_name = f"atelier_ext_{info.name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(
        module_name, entry, submodule_search_locations=[str(folder)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so dataclasses, pickling and relative imports work
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def discover_folders(dirs: Iterable[Path]) -> list[tuple[ExtensionInfo, Loader]]:
    found = []
    for root in dirs:
        if not Path(root).is_dir():
            continue
        for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            info = read_folder_metadata(folder)
            info.bundled = info.name in BUNDLED_EXTENSIONS and folder.parent.name == "extensions"
            found.append((info, lambda info=info: _import_folder(info)))
    return found


def discover_entry_points(entry_points: Iterable[Any] | None = None) -> list[tuple[ExtensionInfo, Loader]]:
    """Installed packages: each entry point loads a module; its EXTENSION dict holds the metadata."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    found = []
    for ep in entry_points:
        try:
            module = ep.load()
            meta = dict(getattr(module, "EXTENSION", {}))
        except Exception as err:  # a broken package is recorded, never fatal
            info = ExtensionInfo(name=ep.name, source="entry point", status="failed")
            _fail(info, "import failed", err)
            found.append((info, lambda: None))
            continue
        info = info_from_metadata(ep.name, meta, None, "entry point")
        found.append((info, lambda module=module: module))
    return found


def _fail(info: ExtensionInfo, what: str, err: BaseException) -> None:
    info.status = "failed"
    info.error = f"{what}: {type(err).__name__}: {err}"
    info.traceback = "".join(traceback.format_exception(err))
    log.error("extension %r: %s\n%s", info.name, info.error, info.traceback)


def _gate(info: ExtensionInfo, settings: Any, disabled: set[str]) -> None:
    """Flags, allow-list, persisted choice and API version, in that order; sets the status."""
    info.enabled = info.name not in disabled
    allow = getattr(settings, "extensions_allow", None)
    if getattr(settings, "disable_all_extensions", False):
        info.status, info.error = "skipped", "--disable-all-extensions"
    elif getattr(settings, "disable_extra_extensions", False) and not info.bundled:
        info.status, info.error = "skipped", "--disable-extra-extensions (not a bundled extension)"
    elif allow is not None and info.name not in allow:
        info.status, info.error = "skipped", "not in --extensions-allow"
    elif not info.enabled:
        info.status, info.error = "disabled", ""
    elif not api_compatible(info.api_version, API_VERSION):
        info.status = "incompatible"
        info.error = (f"needs plugin API {info.api_version}, but this Atelier provides {API_VERSION} "
                      f"(same major version required); skipped")
        log.warning("extension %r %s", info.name, info.error)


def _dedupe(found: list[tuple[ExtensionInfo, Loader]]) -> list[tuple[ExtensionInfo, Loader]]:
    seen: set[str] = set()
    for info, _ in found:
        if info.name in seen and info.status == "pending":
            info.status, info.error = "failed", f"another extension is already named {info.name!r}"
        seen.add(info.name)
    return found


def load_extensions(settings: Any, entry_points: Iterable[Any] | None = None
                    ) -> tuple[list[ExtensionInfo], list[tuple[ExtensionInfo, object]]]:
    """Discover and import; returns every record and the (record, plugin) pairs to register, in order."""
    dirs = getattr(settings, "extensions_dirs", ())
    found = _dedupe([*discover_folders(dirs), *discover_entry_points(entry_points)])
    disabled = ExtensionState(settings.data_dir).disabled()
    for info, _ in found:
        if info.status == "pending":
            _gate(info, settings, disabled)
    loaders = {id(info): load for info, load in found}
    plugins = []
    for info in order_extensions(i for i, _ in found if i.status == "pending"):
        start = time.perf_counter()
        try:
            module = loaders[id(info)]()
        except BaseException as err:  # noqa: B036 - SystemExit from an extension must not stop the app
            _fail(info, "import failed", err)
        else:
            try:
                plugins.append((info, plugin_for_app(module, settings)))
            except BaseException as err:  # noqa: B036 - as above
                _fail(info, f"{PLUGIN_FACTORY} failed", err)
        info.load_time_s = time.perf_counter() - start
    return [info for info, _ in found], plugins


def plugin_for_app(module: object, settings: Any) -> object:
    """What one app registers for an imported extension: `create_plugin(settings)`'s object, else the module.

    The factory runs once per app, so state the extension keeps on that object (caches, scans)
    is never shared between two apps in one process.
    """
    factory = getattr(module, PLUGIN_FACTORY, None)
    return factory(settings) if callable(factory) else module


def _register(manager: pluggy.PluginManager, info: ExtensionInfo, plugin: object) -> None:
    start = time.perf_counter()
    try:
        manager.register(plugin, name=info.name)
        info.status = "loaded"
    except Exception as err:  # e.g. a hook implementation with arguments the spec lacks
        _fail(info, "registration failed", err)
    info.load_time_s += time.perf_counter() - start


def _warn_unknown_hooks(manager: pluggy.PluginManager, infos: list[ExtensionInfo]) -> None:
    by_name = {i.name: i for i in infos if i.status == "loaded"}
    for name, caller in vars(manager.hook).items():
        if getattr(caller, "spec", True) is None:
            for impl in caller.get_hookimpls():
                if impl.plugin_name in by_name:
                    by_name[impl.plugin_name].warnings.append(f"implements unknown hook {name!r} (typo?)")


def build_plugin_host(settings: Any, extra_plugins: Iterable[object] = (), trace: bool = False,
                      entry_points: Iterable[Any] | None = None) -> PluginHost:
    """Built-ins first, then `extra_plugins`, then extensions in before/after order."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos, plugins = load_extensions(settings, entry_points)
    # pluggy calls the last registered first: register in reverse so calls follow our order.
    for info, plugin in reversed(plugins):
        _register(manager, info, plugin)
    for plugin in reversed(list(extra_plugins)):
        manager.register(plugin)
    for name, plugin in reversed(builtin_plugins()):
        manager.register(plugin, name=name)
    _warn_unknown_hooks(manager, infos)
    for info in infos:
        if info.status == "loaded":
            log.info("extension %s %s loaded in %.3f s", info.name, info.version, info.load_time_s)
    return PluginHost(manager, infos, trace=trace)
