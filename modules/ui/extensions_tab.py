"""The Extensions tab (status, errors, enable/disable) and the tabs extensions add."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from modules.errors import AtelierError
from modules.plugins.extensions import ExtensionState
from modules.plugins.install import check_install_allowed, install_from_git
from modules.plugins.ui import extensions_table, ui_tabs
from modules.ui.context import UIContext
from modules.ui.sections import UIBuildContext

COLUMNS = ("Extension", "Version", "Status", "Enabled", "Bundled", "Errors")


@dataclass
class ExtensionsTab:
    table: gr.Dataframe
    enabled: gr.CheckboxGroup
    apply: gr.Button
    message: gr.Markdown
    install_url: gr.Textbox
    install: gr.Button


def extension_rows(ui: UIContext) -> list[list]:
    rows = []
    for info in extensions_table(ui.app.plugins):
        errors = [info.error] if info.error else []
        errors += [f"{e.hook}: {e.message}" for e in info.hook_errors]
        rows.append([info.name, info.version, info.status, "yes" if info.enabled else "no",
                     "yes" if info.bundled else "no", "; ".join(errors)])
    return rows


def build_extensions_tab(ui: UIContext) -> ExtensionsTab:
    infos = extensions_table(ui.app.plugins)
    with gr.Tab("Extensions", id="extensions", elem_id="tab-extensions") as tab:
        table = gr.Dataframe(headers=list(COLUMNS), value=extension_rows(ui), interactive=False, wrap=True,
                             elem_id="extensions-table")
        enabled = gr.CheckboxGroup([i.name for i in infos], value=[i.name for i in infos if i.enabled],
                                   label="Enabled extensions (applied at the next start)",
                                   elem_id="extensions-enabled")
        apply = gr.Button("Apply", elem_id="extensions-apply")
        with gr.Row():
            install_url = gr.Textbox(label="Install from a git URL (off when serving beyond localhost)",
                                     placeholder="https://example.org/someone/atelier-extension.git",
                                     elem_id="extensions-install-url", scale=4)
            install = gr.Button("Install", elem_id="extensions-install", scale=1)
        message = gr.Markdown("", elem_id="extensions-message")

    def save(chosen: list[str], request: gr.Request) -> tuple:
        return apply_enabled(ui, set(chosen or []), request)

    def install_clicked(url: str, request: gr.Request) -> str:
        return install_extension(ui, url, request)

    apply.click(save, inputs=enabled, outputs=[table, message], queue=False)
    install.click(install_clicked, inputs=install_url, outputs=message)
    tab.select(lambda: extension_rows(ui), outputs=table, queue=False)
    return ExtensionsTab(table, enabled, apply, message, install_url, install)


def install_extension(ui: UIContext, url: str, request) -> str:
    """Clone an extension from a git URL into extensions/; refused beyond localhost and for non-admins."""
    server = ui.server
    if not server.may_change_extensions(ui.caller(request)):
        return "❌ Only admin users (`--admin-users`) may install extensions."
    try:
        info = install_from_git(url or "", ui.app.settings, server.config.host)
    except AtelierError as err:
        return f"❌ {err}"
    return f"✅ Installed {info.name} {info.version or ''}. Restart Atelier to load it."


def apply_enabled(ui: UIContext, chosen: set[str], request) -> tuple:
    server = ui.server
    if not server.may_change_extensions(ui.caller(request)):
        return gr.skip(), "❌ Only admin users (`--admin-users`) may change extensions."
    try:
        check_install_allowed(server.config.host, ui.app.settings)
    except AtelierError as err:
        return gr.skip(), f"❌ {err}"
    state = ExtensionState(ui.app.settings.data_dir)
    changed = []
    for info in extensions_table(ui.app.plugins):
        wanted = info.name in chosen
        if wanted != info.enabled:
            state.set_enabled(info.name, wanted)
            info.enabled = wanted
            changed.append(f"{info.name} {'enabled' if wanted else 'disabled'}")
    if not changed:
        return extension_rows(ui), "Nothing changed."
    return extension_rows(ui), "✅ " + ", ".join(changed) + ". Restart Atelier to apply."


def build_extension_tabs(ui: UIContext) -> None:
    """Tabs from `register_ui_tabs`; a tab whose build fails shows the error instead."""
    for spec in ui_tabs(ui.app.plugins):
        with gr.Tab(spec.title, id=f"ext-{spec.name}", elem_id=f"tab-ext-{spec.name}"):
            try:
                spec.build(UIBuildContext(ui.app, spec.name))
            except Exception as err:  # one broken extension never breaks the UI
                ui.app.plugins.record("register_ui_tabs", spec.name, err)
                gr.Markdown(f"⚠ This tab failed to build: {type(err).__name__}: {err}")
