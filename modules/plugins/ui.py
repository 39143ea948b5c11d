"""What the web UI needs from extensions: sections per generation tab, whole tabs, the extensions list.

Rendering is the UI's job; this module only gathers specs. Post-processors with options
get a section of their own, headed by an "Enable" checkbox.
"""
from __future__ import annotations

from typing import Any

from modules.plugins.extensions import ExtensionInfo
from modules.plugins.host import PluginHost
from modules.plugins.jobhooks import ui_sections
from modules.plugins.specs import OptionSpec, UISectionSpec, UITabSpec


def sections_for_tab(host: PluginHost, registries: Any, tab: str) -> list[UISectionSpec]:
    """UI sections for "txt2img" or "img2img", in order; values go to extension_args[section.name]."""
    sections = list(ui_sections(host, tab))
    for spec in registries.postprocessors:
        if spec.options and not spec.always_on:
            enable = OptionSpec("enabled", "Enable", False, "checkbox")
            sections.append(UISectionSpec(spec.name, spec.label, options=(enable, *spec.options), order=spec.order))
    return sorted(sections, key=lambda s: s.order)


def ui_tabs(host: PluginHost) -> list[UITabSpec]:
    return sorted((spec for _, spec in host.specs("register_ui_tabs")), key=lambda s: s.order)


def extensions_table(host: PluginHost) -> list[ExtensionInfo]:
    """The Extensions tab's rows: every discovered extension with its status and errors."""
    return list(host.extensions)
