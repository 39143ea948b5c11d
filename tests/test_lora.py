"""LoRA / LyCORIS through the bundled `lora` extension: tags, formats, math, copy-on-write patching,
restore, hashes and bad input, on the tiny checkpoints."""
from __future__ import annotations

import hashlib
import struct
import sys

import numpy as np
import pytest
import torch

from modules.errors import InvalidParams
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk

SMALL = dict(steps=2, width=64, height=64, seed=7, sampler_name="Euler")


def lora_ext():
    return sys.modules["atelier_ext_lora"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("lora")
    extra = root / "extra-loras"
    engine = make_engine(root, lora_dirs=(extra,))
    engine.load_model(tiny_checkpoints["sd1"])
    model = engine.require_model()
    loras = root / "models" / "Lora"
    unet = mk.module_layers(model.unet, "lora_unet_")
    te = mk.module_layers(model.text_encoders[0], "lora_te_text_model_")
    mk.write(mk.lora_tensors({**unet, **te}, seed=1), loras / "full.safetensors",
             {"ss_output_name": "full-alias", "ss_network_dim": "2"})
    mk.write(mk.lora_tensors(mk.select(unet, ["attn2", "conv1"]), seed=2), extra / "style" / "second.safetensors")
    return engine, root


def run(engine, prompt, **kw):
    return engine.txt2img(Txt2ImgParams(prompt=prompt, **{**SMALL, **kw}))


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def patched_weights(engine, prompt, module="down_blocks.0.attentions.0.proj_in", target="unet"):
    """The weight inside the job's patch, and after it is reverted."""
    hooks = engine.job_hooks("txt2img")
    params = hooks.prepare(Txt2ImgParams(prompt=prompt, **SMALL))
    patch = hooks.patch(engine.require_model(), params)
    weight = patch.weight(target, module) if module in patch.modules(target) else None
    with patch.applied():
        inside = weight.detach().clone()
    return inside, weight.detach().clone(), hooks


def test_hook_patch_model(setup):
    """The math against an independent computation: W + m * (alpha / rank) * up @ down, then exact restore."""
    engine, root = setup
    model = engine.require_model()
    from safetensors.torch import load_file

    sd = load_file(str(root / "models" / "Lora" / "full.safetensors"))
    for module, target, key, m in [
        ("down_blocks.0.attentions.0.proj_in", "unet", "lora_unet_down_blocks_0_attentions_0_proj_in", 2.0),
        ("down_blocks.0.resnets.0.conv1", "unet", "lora_unet_down_blocks_0_resnets_0_conv1", 2.0),  # LoCon 3x3
        ("encoder.layers.0.self_attn.q_proj", "te0", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 0.5),
    ]:
        original = dict(model.unet.named_modules() if target == "unet" else
                        model.text_encoders[0].named_modules())[module].weight.detach().clone()
        inside, after, hooks = patched_weights(engine, "x <lora:full:te=0.5:unet=2>", module, target)
        up, down, alpha = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"], float(sd[f"{key}.alpha"])
        rank = down.shape[0]
        expected = original + m * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(original.shape)
        assert torch.allclose(inside, expected, atol=1e-6), module
        assert not torch.equal(inside, original)
        assert torch.equal(after, original), "restore must be bit-identical"
        digest = hashlib.sha256()
        data = (root / "models" / "Lora" / "full.safetensors").read_bytes()
        digest.update(data[8 + struct.unpack("<Q", data[:8])[0]:])
        assert hooks.infotext()["Lora hashes"] == f"full: {digest.hexdigest()[:12]}"


def test_positional_multipliers_and_lyco_alias(setup):
    engine, _ = setup
    te_only, _, _ = patched_weights(engine, "<lyco:full:1:0>")
    plain, after, _ = patched_weights(engine, "<lora:full:0>")
    assert torch.equal(te_only, after) and torch.equal(plain, after)  # unet multiplier 0: untouched
    one, _, _ = patched_weights(engine, "<lora:full:1>")
    two, _, _ = patched_weights(engine, "<lora:full:0.5> <lora:full:0.5>")
    assert torch.allclose(one, two, atol=1e-6)  # stacking adds


def test_txt2img_with_one_and_two_loras_and_restore(setup, tiny_checkpoints, tmp_path):
    engine, _ = setup
    base = run(engine, "a cat")
    one = run(engine, "a cat <lora:full:1>")
    two = run(engine, "a cat <lora:full:1> <lora:style/second:1>")
    zero = run(engine, "a cat <lora:full:0>")
    after = run(engine, "a cat")
    assert one.warnings == [] and two.warnings == []
    assert not np.array_equal(pixels(base), pixels(one)) and not np.array_equal(pixels(one), pixels(two))
    assert np.array_equal(pixels(base), pixels(zero))
    assert np.array_equal(pixels(base), pixels(after))
    assert "Lora hashes" in two.infotexts[0] and "second:" in two.infotexts[0].split("Lora hashes")[1]
    assert two.prompts[0] == "a cat <lora:full:1> <lora:style/second:1>"  # tags stay for "send to txt2img"
    fresh = make_engine(tmp_path)
    fresh.load_model(tiny_checkpoints["sd1"])
    assert np.array_equal(pixels(run(fresh, "a cat")), pixels(after))


def test_unknown_name_warns_and_runs(setup):
    engine, _ = setup
    result = run(engine, "a cat <lora:does-not-exist:1>")
    assert result.images and "Networks not found: does-not-exist" in result.warnings
    assert "Lora hashes" not in result.infotexts[0]


def test_corrupt_file_is_a_clear_error(setup):
    engine, root = setup
    (root / "models" / "Lora" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InvalidParams, match="broken.*not a valid safetensors"):
        run(engine, "a cat <lora:broken:1>")
    (root / "models" / "Lora" / "pickle.pt").write_bytes(b"not a zip or a pickle")
    with pytest.raises(InvalidParams, match="pickle.*weights_only"):
        run(engine, "a cat <lora:pickle:1>")
    assert np.array_equal(pixels(run(engine, "a cat")), pixels(run(engine, "a cat <lora:full:0>")))


def test_lora_for_another_architecture_warns(setup, tiny_checkpoints, tmp_path):
    engine, root = setup
    sdxl_layers = mk.checkpoint_layers(tiny_checkpoints["sdxl"], mk.UNET, "lora_unet_")
    mk.write(mk.lora_tensors(mk.select(sdxl_layers, ["input_blocks_4", "input_blocks_5"])),
             root / "models" / "Lora" / "xl.safetensors")
    result = run(engine, "a cat <lora:xl:1>")
    assert result.images and any("xl" in w and "another architecture" in w or "do not fit" in w
                                 for w in result.warnings), result.warnings


def test_sdxl_kohya_ldm_names_te1_te2(tiny_checkpoints, tmp_path):
    """SDXL files use ldm UNet names and lora_te1_/lora_te2_: every layer must find its module."""
    engine = make_engine(tmp_path)
    engine.load_model(tiny_checkpoints["sdxl"])
    model = engine.require_model()
    layers = mk.checkpoint_layers(tiny_checkpoints["sdxl"], mk.UNET, "lora_unet_")
    layers.update(mk.checkpoint_layers(tiny_checkpoints["sdxl"], mk.SDXL_TE1, "lora_te1_text_model_"))
    te2 = mk.module_layers(model.text_encoders[1], "")  # transformers keeps text_model. in ...WithProjection
    layers.update({"lora_te2_text_model_" + k.removeprefix("text_model_"): v for k, v in te2.items()})
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in layers
    assert any("input_blocks_4_1_transformer_blocks_0_attn2_to_k" in k for k in layers)
    mk.write(mk.lora_tensors(layers), tmp_path / "models" / "Lora" / "xl.safetensors")
    result = run(engine, "a cat <lora:xl:1>", width=64, height=64)
    assert result.warnings == [] and "Lora hashes" in result.infotexts[0]
    hooks = engine.job_hooks("txt2img")
    params = hooks.prepare(Txt2ImgParams(prompt="<lora:xl:1>", **SMALL))
    assert len(hooks.patch(model, params)) == len(layers)


def test_peft_loha_lokr_formats(setup):
    engine, root = setup
    model = engine.require_model()
    unet = mk.module_layers(model.unet, "unet.", dotted=True)
    mk.write(mk.lora_tensors(mk.select(unet, ["attn1.to_q"]), peft=True, alpha=None),
             root / "models" / "Lora" / "peft.safetensors")
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    inside, after, _ = patched_weights(engine, "<lora:peft:1>", module)
    from safetensors.torch import load_file

    sd = load_file(str(root / "models" / "Lora" / "peft.safetensors"))
    a, b = sd[f"unet.{module}.lora_A.weight"], sd[f"unet.{module}.lora_B.weight"]
    assert torch.allclose(inside, after + b @ a, atol=1e-6)  # no alpha: scale 1

    flat = mk.module_layers(model.unet, "lora_unet_")
    mk.write(mk.loha_tensors(mk.select(flat, ["attn1_to_q"])), root / "models" / "Lora" / "loha.safetensors")
    mk.write(mk.lokr_tensors(mk.select(flat, ["attn1_to_q"])), root / "models" / "Lora" / "lokr.safetensors")
    key = "lora_unet_" + module.replace(".", "_")
    sd = load_file(str(root / "models" / "Lora" / "loha.safetensors"))
    inside, after, _ = patched_weights(engine, "<lora:loha:0.7>", module)
    hada = (sd[f"{key}.hada_w1_a"] @ sd[f"{key}.hada_w1_b"]) * (sd[f"{key}.hada_w2_a"] @ sd[f"{key}.hada_w2_b"])
    assert torch.allclose(inside, after + 0.7 * (1.0 / 2) * hada, atol=1e-6)
    sd = load_file(str(root / "models" / "Lora" / "lokr.safetensors"))
    inside, after, _ = patched_weights(engine, "<lyco:lokr:1>", module)
    kron = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
    assert torch.allclose(inside, after + (1.0 / 2) * kron, atol=1e-6)


def test_unsupported_lycoris_type_is_named(setup):
    engine, root = setup
    mk.write({"lora_unet_down_blocks_0_attentions_0_proj_in.diff": torch.zeros(32, 32, 1, 1)},
             root / "models" / "Lora" / "full-diff.safetensors")
    result = run(engine, "a cat <lora:full-diff:1>")
    assert any("full (diff)" in w for w in result.warnings), result.warnings


def test_hook_register_extra_networks(setup):
    engine, root = setup
    registry = engine.registries.extra_networks
    assert registry.get("lyco") is registry.get("lora")
    (root / "models" / "Lora" / "full.json").write_text('{"activation text": "ink style", "preferred weight": 0.6}')
    (root / "models" / "Lora" / "full.preview.png").write_bytes(b"png")
    registry.get("lora").refresh()
    items = {i.name: i for i in registry.get("lora").items()}
    assert items["full"].prompt == "<lora:full:0.6> ink style" and items["full"].preview.endswith("full.preview.png")
    assert items["style/second"].folder == "style" and items["style/second"].prompt == "<lora:style/second:1>"
    assert items["full"].metadata()["ss_output_name"] == "full-alias"
    browser = sys.modules["atelier_ext_lora.browser"]
    assert [i.name for i in browser.filter_items(list(items.values()), "", "style")] == ["style/second"]
    assert [i.name for i in browser.filter_items(list(items.values()), "SECOND")] == ["style/second"]
    html = browser.render_cards(list(items.values()), "txt2img", "lora")
    assert html.count('class="atelier-card"') == len(items) and "&lt;lora:full:0.6&gt; ink style" in html
    assert not registry.get("textual inversion").tags and registry.get("checkpoints").items() == []
    assert run(engine, "a cat <lora:full-alias:0>").warnings == []  # found by its training alias
