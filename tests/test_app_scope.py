"""State belongs to one App: two apps in one process share no styles, LoRA libraries or specs,
and building an app again leaves every registry and hook-implementation list as it was."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from modules.plugins.loader import build_plugin_host
from modules.plugins.manager import build_registries
from modules.plugins.specs import StyleSpec
from modules.server.config import ServerConfig
from modules.server.context import build_context
from modules.styles import load_styles_csv
from modules.ui.context import UIContext
from modules.ui.prompts import save_prompt_style
from tests.conftest import make_app
from tests.plugin_helpers import ext_settings

BUNDLED = Path(__file__).resolve().parent.parent / "extensions"
REGISTRIES = ("samplers", "schedulers", "styles", "postprocessors", "upscalers", "extra_networks")


def scoped_app(root: Path):
    return make_app(root, extensions_dirs=(BUNDLED,), styles_file=root / "styles.csv")


def sizes(app) -> dict[str, int]:
    """The length of every registry and of every hook's implementation list."""
    out = {name: len(getattr(app.registries, name)) for name in REGISTRIES}
    out.update({f"hook {name}": len(caller.get_hookimpls()) for name, caller in vars(app.plugins.manager.hook).items()})
    out["extension records"] = len(app.plugins.extensions)
    return out


def lora_plugin(app):
    return app.plugins.manager.get_plugin("lora")


def test_a_style_saved_in_one_app_is_not_in_another(tmp_path):
    one, other = scoped_app(tmp_path / "one"), scoped_app(tmp_path / "other")
    assert one.registries.styles is not other.registries.styles
    save_prompt_style(UIContext(build_context(one, ServerConfig())), "Mine", "{prompt}, mine", "blurry")
    assert one.registries.styles.get("mine") == StyleSpec("Mine", "{prompt}, mine", "blurry", "styles.csv")
    assert "Mine" not in other.registries.styles and "Mine" not in other.registries.styles.names()
    assert [s.name for s in load_styles_csv(tmp_path / "one" / "styles.csv")] == ["Mine"]
    assert not (tmp_path / "other" / "styles.csv").exists()

    names = one.registries.styles.names()
    one.registries.styles.save(StyleSpec("Mine", "{prompt}, changed", "", "styles.csv"))  # replace, in place
    assert one.registries.styles.names() == names
    assert one.registries.styles.get("Mine").prompt == "{prompt}, changed"
    assert [s.prompt for s in load_styles_csv(tmp_path / "one" / "styles.csv")] == ["{prompt}, changed"]


def test_lora_libraries_and_specs_are_per_app(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(loras / "only-here.safetensors"))
    one = make_app(tmp_path / "one", extensions_dirs=(BUNDLED,), lora_dirs=(loras,))
    other = make_app(tmp_path / "other", extensions_dirs=(BUNDLED,))
    a, b = lora_plugin(one), lora_plugin(other)
    assert a is not b and a.loras is not b.loras and a.embeddings is not b.embeddings
    assert a.specs["lora"] == [one.registries.extra_networks.get("lora")]  # the routes serve this app's cards
    assert b.specs["lora"] == [other.registries.extra_networks.get("lora")]
    assert "only-here" in [i.name for i in one.registries.extra_networks.get("lora").items()]
    assert "only-here" not in [i.name for i in other.registries.extra_networks.get("lora").items()]


def test_building_an_app_again_changes_no_registry_or_hook_list(tmp_path):
    first = sizes(scoped_app(tmp_path / "1"))
    for n in (2, 3):
        assert sizes(scoped_app(tmp_path / str(n))) == first
    assert first["hook register_extra_networks"] == 1 and first["extra_networks"] == 3


def test_an_extension_module_loaded_once_still_gets_one_plugin_per_app(tmp_path):
    """An installed package is imported once per process (entry points); its factory runs per app."""
    lora = lora_plugin(scoped_app(tmp_path / "seed"))
    module = SimpleNamespace(EXTENSION={"api_version": "1.2"}, create_plugin=type(lora))
    entry = SimpleNamespace(name="lora-ep", load=lambda: module)
    hosts, registries = [], []
    for n in range(3):
        settings = ext_settings(tmp_path / str(n), dirs=())
        hosts.append(build_plugin_host(settings, entry_points=[entry]))
        registries.append(build_registries(hosts[-1], settings))
    plugins = [host.manager.get_plugin("lora-ep") for host in hosts]
    assert len({id(p) for p in plugins}) == 3
    assert [len(r.extra_networks) for r in registries] == [3, 3, 3]
    assert all(len(p.specs["lora"]) == 1 for p in plugins)
    assert [len(h.manager.hook.register_extra_networks.get_hookimpls()) for h in hosts] == [1, 1, 1]
