"""Stability Control-LoRA files in the controlnet extension: a Control-LoRA (low-rank deltas on the base
UNet, `lora_controlnet`) gives the same latents as the full original-layout ControlNet composed by hand from
the checkpoint's own tensors; it is rebuilt for another base, and refused on another architecture."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from extensions.controlnet import control  # noqa: E402
from extensions.controlnet.models import read_controlnet  # noqa: E402
from extensions.controlnet.units import Unit  # noqa: E402
from modules.plugins import api  # noqa: E402
from modules.settings import REPO_ROOT  # noqa: E402
from tests.conftest import make_app  # noqa: E402
from tests.fixtures.make_tiny_controlnet import tiny_controlnet_state_dict  # noqa: E402
from tests.test_controlnet import hint_image, latents, params  # noqa: E402

CONTROL_ONLY = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def control_lora_and_expected(checkpoint, seed: int = 5):
    """(Control-LoRA tensors, the full ControlNet they stand for), both in lllyasviel's names."""
    unet = {k.removeprefix("model.diffusion_model."): v.float() for k, v in load_file(str(checkpoint)).items()
            if k.startswith("model.diffusion_model.")}
    gen = torch.Generator().manual_seed(seed)
    lora, full = {"lora_controlnet": torch.zeros(0)}, {}
    for n, (key, value) in enumerate(sorted(tiny_controlnet_state_dict("sd1", seed=seed, prefix="").items())):
        if key.startswith(CONTROL_ONLY):
            lora[key] = full[key] = value.float()
        elif key.endswith(".weight") and value.ndim >= 2:  # a low-rank delta on the base weight
            base = unet[key]
            up = torch.randn(base.shape[0], 2, *([1, 1] if base.ndim == 4 else []), generator=gen) * 0.1
            down = torch.randn(2, *base.shape[1:], generator=gen) * 0.1
            lora[key[:-7] + ".up"], lora[key[:-7] + ".down"] = up, down
            full[key] = base + (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        elif n % 3 == 0:  # a full tensor replacing the base's
            lora[key] = full[key] = torch.randn(value.shape, generator=gen) * 0.1 + unet[key]
        else:  # the base's own tensor
            full[key] = unet[key]
    return lora, {f"control_model.{k}": v for k, v in full.items()}


@pytest.fixture(scope="module")
def lora_app(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("control-lora")
    folder = tmp / "models" / "ControlNet"
    folder.mkdir(parents=True)
    lora, full = control_lora_and_expected(tiny_checkpoints["sd1"])
    save_file(lora, str(folder / "control-lora-canny-rank2-sd1.safetensors"))
    save_file(full, str(folder / "composed-sd1.safetensors"))
    app = make_app(tmp, extensions_dirs=(REPO_ROOT / "extensions",))
    app.engine.load_model(tiny_checkpoints["sd1"])
    return app


def units(model: str) -> dict:
    return {"controlnet": {"args": [{"image": hint_image(), "module": "none", "model": model}]}}


def test_control_lora_gives_the_composed_controlnets_latents(lora_app):
    cn = read_controlnet(lora_app.plugins.manager.get_plugin("controlnet").library.find("control-lora-canny-rank2-sd1"))
    assert (cn.kind, cn.layout, cn.arch) == ("control_lora", "control-lora", "sd1")
    plain, _, _ = latents(lora_app, params())
    expected, _, _ = latents(lora_app, params(extension_args=units("composed-sd1")))
    ours, _, result = latents(lora_app, params(extension_args=units("control-lora-canny-rank2-sd1")))
    assert (expected - plain).abs().mean() > 0.05
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert "Model: control-lora-canny-rank2-sd1" in result.infotexts[0]


def test_control_lora_on_another_architecture_names_both(lora_app):
    library = lora_app.plugins.manager.get_plugin("controlnet").library
    planned = control.plan_units([Unit(image=hint_image(), model="control-lora-canny-rank2-sd1")], library)
    with pytest.raises(api.InvalidParams, match="is a SD1.5 Control-LoRA, but the loaded checkpoint is SDXL"):
        control.check_arch(planned, library, "sdxl")


def test_a_half_pair_is_refused_by_name(tmp_path):
    save_file({"lora_controlnet": torch.zeros(0), "input_blocks.1.0.in_layers.2.up": torch.zeros(4, 2, 1, 1)},
              str(tmp_path / "broken.safetensors"))
    from extensions.controlnet import control_lora

    with pytest.raises(api.InvalidParams, match="in_layers.2.up has no matching .down"):
        control_lora.split(load_file(str(tmp_path / "broken.safetensors")))
