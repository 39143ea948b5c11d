"""The pluggy manager plus isolation: every hook implementation is called on its own.

A hook that raises is logged with its stack trace and recorded on its extension's
record; the caller decides whether that fails the job (`strict`) or only adds a
warning. An `AtelierError` raised by a hook is a deliberate refusal and always
propagates. With `trace=True` (ATELIER_TRACE_HOOKS=1) every call is logged with its
arguments and timing.
"""
from __future__ import annotations

import logging
import reprlib
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from modules.errors import AtelierError
from modules.plugins.extensions import ExtensionError, ExtensionInfo, HookError

log = logging.getLogger("atelier.plugins")
_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def _short(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"tensor{tuple(shape)}"
    return _repr.repr(value)


@dataclass
class HookCall:
    """The answers of one hook call, in call order, and the implementations that failed."""

    results: list[tuple[str, Any]] = field(default_factory=list)
    errors: list[HookError] = field(default_factory=list)

    def values(self) -> list[Any]:
        return [value for _, value in self.results]

    def warnings(self) -> list[str]:
        return [f"Extension {e.plugin!r} failed in {e.hook} and was skipped: {e.message}" for e in self.errors]


class PluginHost:
    """Calls hooks one implementation at a time, in order, isolating failures."""

    def __init__(self, manager: pluggy.PluginManager, extensions: Iterable[ExtensionInfo] = (),
                 trace: bool = False) -> None:
        self.manager = manager
        self.extensions = list(extensions)
        self.trace = trace
        self.errors: list[HookError] = []  # every failed call since start, builtins included
        self.owners: dict[tuple[str, str], str] = {}  # (kind, spec name) -> plugin that registered it

    def extension(self, name: str) -> ExtensionInfo | None:
        return next((e for e in self.extensions if e.name == name), None)

    def implementations(self, hook: str) -> list[Any]:
        """Hook implementations in call order (pluggy's: last registered and `tryfirst` first)."""
        caller = getattr(self.manager.hook, hook)
        return [i for i in reversed(caller.get_hookimpls()) if not (i.hookwrapper or i.wrapper)]

    def has(self, hook: str) -> bool:
        return bool(self.implementations(hook))

    def call_one(self, hook: str, impl: Any, kwargs: dict[str, Any], strict: bool = False,
                 refusals: bool = True) -> tuple[bool, Any]:
        """Call one implementation; returns (True, value) or (False, HookError).

        Raises if it fails and `strict`; an AtelierError (a deliberate refusal) propagates when `refusals`.
        """
        args = {name: kwargs[name] for name in impl.argnames if name in kwargs}
        start = time.perf_counter()
        try:
            value = impl.function(**args)
        except Exception as err:  # any extension bug is isolated here
            if refusals and isinstance(err, AtelierError):
                raise
            error = self.record(hook, impl.plugin_name, err)
            if strict:
                raise ExtensionError(f"Extension {impl.plugin_name!r} failed in {hook}: {error.message}") from err
            return False, error
        finally:
            if self.trace:
                shown = ", ".join(f"{k}={_short(v)}" for k, v in args.items())
                log.info("hook %s.%s(%s) %.2f ms", impl.plugin_name, hook, shown,
                         (time.perf_counter() - start) * 1000)
        return True, value

    def call(self, hook: str, strict: Callable[[str], bool] | None = None, refusals: bool = True,
             **kwargs: Any) -> HookCall:
        """Call every implementation; `strict(plugin_name)` says whose failure must fail the caller."""
        outcome = HookCall()
        for impl in self.implementations(hook):
            ok, value = self.call_one(hook, impl, kwargs, strict=bool(strict and strict(impl.plugin_name)),
                                      refusals=refusals)
            if ok:
                outcome.results.append((impl.plugin_name, value))
            else:
                outcome.errors.append(value)
        return outcome

    def specs(self, hook: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Flatten a `register_*` hook's lists into (plugin name, spec) pairs; failures are recorded."""
        for plugin, value in self.call(hook, refusals=False, **kwargs).results:
            yield from ((plugin, spec) for spec in (value or ()))

    def record(self, hook: str, plugin: str, err: Exception) -> HookError:
        """Log a failure with its stack trace and keep it on the plugin's extension record."""
        trace = "".join(traceback.format_exception(err))
        log.error("extension %r failed in hook %s:\n%s", plugin, hook, trace)
        error = HookError(plugin, hook, f"{type(err).__name__}: {err}", trace)
        self.errors.append(error)
        info = self.extension(plugin)
        if info is not None:
            info.hook_errors.append(error)
        return error
