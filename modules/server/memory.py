"""The memory policy as a server option: flags versus saved options, applying a change, the report.

A memory flag on the command line (--memory-policy, --offload, --medvram, --lowvram, --gpu-weights)
wins over the value saved in config.json; without one, the saved options choose. A change through
/sdapi/v1/options or the Settings tab is applied to every worker's engine at once (after the job
it may be running); the loaded model is re-placed, not reloaded.
"""
from __future__ import annotations

import logging
from typing import Any

from modules.errors import InvalidParams
from modules.pipeline.memory_policy import (
    OPTION_KEYS,
    policy_from_options,
    policy_from_settings,
    policy_options,
)

log = logging.getLogger(__name__)


def memory_flags_given(settings: Any) -> bool:
    return (settings.memory_policy is not None or settings.offload is not None or settings.vram != "normal"
            or settings.gpu_weights is not None)


def apply_memory_options(ctx: Any, changes: dict[str, Any], quiet: bool = False) -> None:
    """An options listener: hand a changed policy to the executor's workers."""
    if not any(key in OPTION_KEYS for key in changes):
        return
    setter = getattr(ctx.executor, "set_memory_policy", None)
    if setter is None:
        if not quiet:
            log.warning("this executor does not change memory policies while it runs; restart with the flags")
        return
    setter(policy_from_options(ctx.options.all()))


def check_memory_options(ctx: Any, changes: dict[str, Any]) -> None:
    """An options validator: a policy the engine cannot follow (--compile-freeze) is refused before it is saved."""
    if any(key in OPTION_KEYS for key in changes):
        ctx.app.engine.check_memory_policy(policy_from_options({**ctx.options.all(), **changes}))


def start_memory_policy(ctx: Any) -> None:
    """At start: flags win (and are saved as the options); else the saved options are applied, unless the
    engine cannot follow them (logged, and the flags' policy kept)."""
    settings = ctx.app.settings
    if memory_flags_given(settings):
        ctx.options.update(policy_options(policy_from_settings(settings)))
    try:
        ctx.app.engine.check_memory_policy(policy_from_options(ctx.options.all()))
    except InvalidParams as err:
        log.warning("the saved memory options are not applied: %s", err)
        ctx.options.update(policy_options(policy_from_settings(settings)))
    ctx.options.validators.append(lambda changes: check_memory_options(ctx, changes))
    ctx.options.listeners.append(lambda changes: apply_memory_options(ctx, changes))
    apply_memory_options(ctx, dict.fromkeys(OPTION_KEYS), quiet=True)


def memory_report(ctx: Any) -> dict[str, Any]:
    """The active policy, its budget and what is resident (the first worker's, and each worker's)."""
    report = getattr(ctx.executor, "memory_report", None)
    if report is not None:
        return report()
    return ctx.app.engine.memory_report()
