"""Discovery, metadata, API versions, ordering, flags, persistence and isolation at load time."""
from __future__ import annotations

import importlib.metadata
import logging

import pytest

from modules.plugins import api
from modules.plugins.extensions import (
    ExtensionInfo,
    ExtensionState,
    api_compatible,
    order_extensions,
    read_folder_metadata,
)
from tests.plugin_helpers import FIXTURES, ext_app, statuses


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return ext_app(tmp_path_factory.mktemp("ext-loading"))


def test_bundled_and_fixture_extensions_are_found(app):
    status = statuses(app)
    for name in ("film-grain", "style-pack", "wildcards", "fixture-sampler", "web-ext",
                 "order-a", "order-b", "order-c", "cfg-probe", "raising-hook", "xyz-grid", "prompt-matrix",
                 "prompts-from-file", "sd-upscale", "loopback", "outpainting-mk2"):
        assert status[name] == "loaded", (name, status[name])
    bundled = {i.name for i in app.plugins.extensions if i.bundled}
    assert bundled == {"film-grain", "style-pack", "wildcards", "lora", "xyz-grid", "prompt-matrix",
                       "prompts-from-file", "sd-upscale", "loopback", "outpainting-mk2", "controlnet"}
    info = app.plugins.extension("film-grain")
    assert info.version == "1.0.0" and info.api_version == "1.0" and info.load_time_s > 0


def test_broken_import_is_isolated_with_its_stack_trace(app):
    info = app.plugins.extension("broken-import")
    assert info.status == "failed"
    assert "ModuleNotFoundError" in info.error and "atelier_module_that_does_not_exist" in info.error
    assert "Traceback" in info.traceback and "broken-import/extension.py" in info.traceback
    assert info.to_dict()["error"] == info.error  # what the Extensions tab shows


def test_incompatible_api_version_is_skipped_with_a_clear_message(app):
    info = app.plugins.extension("future-api")
    assert info.status == "incompatible"
    assert "needs plugin API 2.0" in info.error and f"provides {api.API_VERSION}" in info.error
    assert app.plugins.manager.get_plugin("future-api") is None  # never imported (it would raise)


@pytest.mark.parametrize("required, ok", [("1", True), ("1.0", True), ("1.1", False), ("0.9", False), ("2.0", False)])
def test_api_compatibility_rule(required, ok):
    assert api_compatible(required, "1.0") is ok


def test_raising_registration_hook_is_isolated(app):
    info = app.plugins.extension("raising-hook")
    assert info.status == "loaded"
    assert [e.hook for e in info.hook_errors][:1] == ["register_styles"]
    assert "styles exploded" in info.hook_errors[0].message and "Traceback" in info.hook_errors[0].traceback
    assert "Cinematic" in app.registries.styles  # the other extensions' styles are all there


def test_before_after_ordering(app):
    names = [i.plugin_name for i in app.plugins.implementations("prepare_params")]
    order = [n for n in names if n.startswith("order-")]
    assert order == ["order-b", "order-c", "order-a"]  # b before a, a after c; otherwise by name
    assert names[0] == "builtin.styles"  # built-ins first: styles may hold wildcards


def test_ordering_cycle_is_broken_by_name_with_a_warning():
    a = ExtensionInfo("a", after=("b",))
    b = ExtensionInfo("b", after=("a",))
    c = ExtensionInfo("c", before=("a",))
    ordered = order_extensions([a, b, c])
    assert [i.name for i in ordered] == ["c", "a", "b"]
    assert any("cycle" in w for w in a.warnings)


def test_missing_metadata_is_a_failed_record(tmp_path):
    (tmp_path / "nometa").mkdir()
    assert read_folder_metadata(tmp_path / "nometa").error == "extension.toml is missing"
    (tmp_path / "noapi").mkdir()
    (tmp_path / "noapi" / "extension.toml").write_text('name = "noapi"\n')
    assert "api_version is required" in read_folder_metadata(tmp_path / "noapi").error
    (tmp_path / "badname").mkdir()
    (tmp_path / "badname" / "extension.toml").write_text('name = "../x"\napi_version = "1.0"\n')
    assert "invalid extension name" in read_folder_metadata(tmp_path / "badname").error


def test_disable_all_extensions(tmp_path):
    app = ext_app(tmp_path, disable_all_extensions=True)
    assert set(statuses(app).values()) == {"skipped"}
    assert "Fixture Euler" not in app.registries.samplers and "Euler CFG++" in app.registries.samplers  # built-ins stay


def test_disable_extra_extensions_keeps_the_bundled_ones(tmp_path):
    status = statuses(ext_app(tmp_path, disable_extra_extensions=True))
    assert status["film-grain"] == status["wildcards"] == "loaded"
    assert status["fixture-sampler"] == status["web-ext"] == "skipped"


def test_allow_list(tmp_path):
    app = ext_app(tmp_path, extensions_allow=("style-pack", "fixture-sampler"))
    loaded = {n for n, s in statuses(app).items() if s == "loaded"}
    assert loaded == {"style-pack", "fixture-sampler"}
    assert "Fixture Euler" in app.registries.samplers


def test_enable_disable_is_persisted_and_applied_at_the_next_start(tmp_path):
    ExtensionState(tmp_path / "data").set_enabled("style-pack", False)
    app = ext_app(tmp_path)
    info = app.plugins.extension("style-pack")
    assert info.status == "disabled" and info.enabled is False
    assert "Cinematic" not in app.registries.styles
    ExtensionState(tmp_path / "data").set_enabled("style-pack", True)
    assert statuses(ext_app(tmp_path))["style-pack"] == "loaded"


def test_entry_point_extensions(tmp_path):
    from modules.app import build_app
    from modules.plugins.loader import build_plugin_host
    from modules.plugins.manager import build_registries
    from tests.plugin_helpers import ext_settings

    ep = importlib.metadata.EntryPoint("ep-ext", "tests.extension_fixtures.ep_module", "atelier.extensions")
    broken = importlib.metadata.EntryPoint("ep-broken", "tests.extension_fixtures.no_such_module", "atelier.extensions")
    host = build_plugin_host(ext_settings(tmp_path, dirs=()), entry_points=[ep, broken])
    assert statuses(type("A", (), {"plugins": host})) == {"ep-ext": "loaded", "ep-broken": "failed"}
    assert host.extension("ep-ext").version == "2.3.4" and host.extension("ep-ext").source == "entry point"
    assert "Entry point style" in build_registries(host).styles
    assert build_app  # the real group is read when no list is given (none installed here)


def test_duplicate_names_and_unknown_hooks(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / "ext" / folder).mkdir(parents=True)
        (tmp_path / "ext" / folder / "extension.toml").write_text('name = "same"\napi_version = "1.0"\n')
        (tmp_path / "ext" / folder / "extension.py").write_text(
            "from modules.plugins import api\n@api.hookimpl\ndef register_stlyes():\n    return []\n")
    app = ext_app(tmp_path, dirs=(tmp_path / "ext",))
    first, second = app.plugins.extensions
    assert first.status == "loaded" and any("register_stlyes" in w for w in first.warnings)
    assert second.status == "failed" and "already named" in second.error


def test_trace_hooks_logs_every_call(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATELIER_TRACE_HOOKS", "1")
    with caplog.at_level(logging.INFO, logger="atelier.plugins"):
        ext_app(tmp_path, dirs=(FIXTURES,), extensions_allow=("fixture-sampler",))
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hook ")]
    assert any(m.startswith("hook fixture-sampler.register_samplers()") and m.endswith(" ms") for m in traced)
    assert any("builtin.styles.register_styles(settings=Settings(" in m for m in traced)
