"""Web UI pieces without a browser: auth flags, config.json, session owners, field bindings."""
from __future__ import annotations

import argparse
import json

import pytest

from modules.errors import AtelierError
from modules.server.config import ServerConfig, StartupRefused, add_server_arguments, server_config_from_args


def parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return server_config_from_args(parser.parse_args(argv))


def test_gradio_auth_flags_and_listen_refusal(tmp_path):
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("bob:pw2\ncarol:a:b\n")
    config = parse(["--listen", "--gradio-auth", "alice:pw", "--gradio-auth-path", str(auth_file)])
    assert config.host == "0.0.0.0"
    assert config.credentials == (("alice", "pw"), ("bob", "pw2"), ("carol", "a:b"))
    config.check_startup()
    assert "login required" in config.banner()
    with pytest.raises(StartupRefused, match="--gradio-auth"):
        parse(["--listen"]).check_startup()
    assert "WITHOUT a login" in parse(["--listen", "--insecure-no-auth"]).banner()
    assert parse([]).host == "127.0.0.1" and parse(["--port", "7999"]).port == 7999
    with pytest.raises(AtelierError, match="--gradio-auth"):
        parse(["--gradio-auth", "nopassword"])


def test_corrupt_config_is_backed_up_and_reported(tmp_path):
    from modules.server.options import Options
    from modules.settings import Settings

    path = tmp_path / "config.json"
    path.write_text("{not json")
    options = Options(Settings(data_dir=tmp_path), path)
    assert "was not valid" in options.load_error
    backups = list(tmp_path.glob("config.json.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_text() == "{not json"
    options.update({"show_progress_every_n_steps": 5})
    assert json.loads(path.read_text())["show_progress_every_n_steps"] == 5
    assert not list(tmp_path.glob("*.tmp")) and Options(Settings(data_dir=tmp_path), path).load_error is None


def test_session_owner_from_cookie_and_user():
    from types import SimpleNamespace

    from modules.ui.session import caller_of_request, session_owner

    def request(state):
        return SimpleNamespace(request=SimpleNamespace(scope={"state": state}))

    token = "a" * 43
    assert caller_of_request(request({"user": "alice"}), ["alice"]).admin
    owner = caller_of_request(request({"session": token})).owner
    assert owner == session_owner(token) and token not in owner
    assert caller_of_request(request({"session": "b" * 43})).owner != owner


def test_infotext_fills_fields_by_name():
    from modules import infotext
    from modules.pipeline.params import Txt2ImgParams
    from modules.ui.bindings import field_defaults, values_from_infotext

    text = ("a fox\nNegative prompt: blur\nSteps: 12, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, "
            "Seed: 42, Size: 96x64, Denoising strength: 0.5, Hires upscale: 1.5, Hires upscaler: Latent")
    values = values_from_infotext(infotext.parse(text), field_defaults(Txt2ImgParams))
    assert values["prompt"] == "a fox" and values["negative_prompt"] == "blur"
    assert values["steps"] == 12 and values["seed"] == 42 and values["cfg_scale"] == 6.5
    assert (values["width"], values["height"]) == (96, 64) and values["sampler_name"] == "Euler a"
    assert values["enable_hr"] and values["hr_scale"] == 1.5 and values["denoising_strength"] == 0.5
    Txt2ImgParams(**values).validate()  # every name is a params field


@pytest.mark.parametrize("listen", [False, True])
def test_extensions_tab_installs_from_git_only_on_localhost(tmp_path, listen):
    from types import SimpleNamespace

    from modules.server.context import build_context
    from modules.ui.context import UIContext
    from modules.ui.extensions_tab import install_extension
    from tests.conftest import make_app
    from tests.plugin_helpers import git_extension_repo

    url = git_extension_repo(tmp_path / "src" / "hello-ext")
    app = make_app(tmp_path, extensions_dirs=(tmp_path / "ext",))
    config = ServerConfig(listen=listen, insecure_no_auth=True)
    ui = UIContext(build_context(app, config))
    message = install_extension(ui, url, SimpleNamespace(headers={}, cookies={}))
    installed = (tmp_path / "ext" / "hello-ext" / "extension.toml").exists()
    if listen:
        assert message.startswith("❌") and "localhost" in message and not installed
    else:  # a file:// URL needs --allow-file-extension-install (issue 23): refused on localhost too
        assert message.startswith("❌") and "--allow-file-extension-install" in message and not installed


def test_demo_model_notice_says_where_real_checkpoints_go(tmp_path):
    from modules.demo import DEMO_CHECKPOINT
    from modules.server.context import build_context
    from modules.ui.checkpoints import _status
    from modules.ui.context import UIContext
    from tests.conftest import make_app

    ui = UIContext(build_context(make_app(tmp_path), ServerConfig()))
    notice = _status(ui, f"{DEMO_CHECKPOINT.name} [0123456789]")
    assert "demo model" in notice and str(tmp_path / "models" / "Stable-diffusion") in notice
    assert ".safetensors" in notice and "diffusers" in notice
    assert _status(ui, "my-real-model.safetensors") == ""
    assert "No checkpoint found" in _status(ui, None)
