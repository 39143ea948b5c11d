"""--compile --compile-backend openvino: images match eager, IR is cached on disk, LoRA patches invalidate it.

Runs the real OpenVINO CPU plugin on the tiny SD1 checkpoint (fp32, 64 px), against the same checkpoint
run eagerly by torch. Skipped only where the openvino package is absent; the missing-package error is
tested everywhere.
"""
from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch

from modules.pipeline.ov_backend import OpenVinoUnavailable, precision_hint, require_openvino, runner_of
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk

pytestmark = pytest.mark.slow  # each conversion takes seconds (tens under load)
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the openvino package is not installed (pip install openvino)")
MIN_PSNR_DB = 40.0  # fp32 OpenVINO against fp32 torch on the same seed; measured 50+ dB


def params(prompt: str = "a red circle") -> Txt2ImgParams:
    return Txt2ImgParams(prompt=prompt, negative_prompt="blue", steps=3, sampler_name="Euler",
                         width=64, height=64, seed=7, rng_source="cpu")


def image(engine, prompt: str = "a red circle") -> np.ndarray:
    return np.asarray(engine.txt2img(params(prompt)).images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def runners(engine) -> dict:
    model = engine.models.current
    parts = {"unet": model.unet, "vae_decoder": model.vae.decoder,
             **{f"te{i}": te for i, te in enumerate(model.text_encoders)}}
    return {name: runner_of(module) for name, module in parts.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("openvino")
    loras = root / "loras"
    eager = make_engine(root / "eager", lora_dirs=(loras,))
    eager.load_model(tiny_sd1)
    model = eager.models.current
    layers = {**mk.module_layers(model.unet, "lora_unet_"),
              **mk.module_layers(model.text_encoders[0], "lora_te_text_model_")}
    mk.write(mk.lora_tensors(layers, seed=1), loras / "style.safetensors")
    ov = make_engine(root / "ov", lora_dirs=(loras,), compile=True, compile_backend="openvino")
    ov.load_model(tiny_sd1)
    return eager, ov, root, tiny_sd1


@needs_openvino
def test_openvino_matches_eager_and_converts_each_part_once(setup):
    eager, ov, _, _ = setup
    found = runners(ov)
    assert all(r is not None for r in found.values()), found
    first, second = image(ov), image(ov)
    assert psnr(first, image(eager)) >= MIN_PSNR_DB
    assert np.abs(first - second).max() <= 2  # OpenVINO's threaded reductions need not be bit-exact
    assert {name: r.conversions for name, r in found.items()} == {name: 1 for name in found}
    assert {name: r.fallbacks for name, r in found.items()} == {name: {} for name in found}
    assert runner_of(eager.models.current.unet) is None


@needs_openvino
def test_second_load_reads_the_cached_ir(setup, tmp_path):
    eager, ov, root, ckpt = setup
    want = image(ov)
    again = make_engine(root / "ov", compile=True, compile_backend="openvino")  # same DATA_DIR
    again.load_model(ckpt)
    assert np.abs(image(again) - want).max() <= 2
    assert all(r.conversions == 0 for r in runners(again).values())
    assert list((root / "ov" / "data" / "cache" / "openvino").glob("unet-*/model.xml"))


@needs_openvino
def test_lora_gets_its_own_ir_and_reverting_restores_the_image(setup):
    eager, ov, _, _ = setup
    base = image(ov)
    unet = runners(ov)["unet"]
    before = unet.conversions
    styled = image(ov, "a red circle <lora:style:1>")
    assert psnr(styled, image(eager, "a red circle <lora:style:1>")) >= MIN_PSNR_DB  # the LoRA applies...
    assert np.abs(styled - base).max() > 10  # ...and shows
    assert unet.conversions == before + 1
    assert np.abs(image(ov) - base).max() <= 2  # restored weights hash as the base: its IR again
    assert np.abs(image(ov, "a red circle <lora:style:1>") - styled).max() <= 2
    assert unet.conversions == before + 1  # the patch set's IR is kept too


@needs_openvino
def test_hooked_submodules_run_eagerly(setup):
    """A hook inside the module (textual inversion, memory policies) is invisible to the graph: run torch."""
    eager, ov, _, _ = setup
    calls = []
    handles = [e.models.current.unet.conv_in.register_forward_hook(lambda m, i, o: calls.append(1) or o * 1.5)
               for e in (eager, ov)]
    try:
        hooked, reference = image(ov), image(eager)
    finally:
        for h in handles:
            h.remove()
    assert calls and runners(ov)["unet"].fallbacks.get("structure", 0) > 0
    assert psnr(hooked, reference) >= MIN_PSNR_DB


def test_bf16_only_where_the_cpu_has_it():
    assert precision_hint(torch.bfloat16, ["BF16", "FP32"]) == "bf16"
    assert precision_hint(torch.bfloat16, ["FP32"]) == "f32"
    assert precision_hint(torch.float32, ["BF16", "FP32"]) == "f32"


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(OpenVinoUnavailable, match="pip install openvino"):
        require_openvino()
    with pytest.raises(OpenVinoUnavailable, match="pip install openvino"):
        make_engine(tmp_path, compile=True, compile_backend="openvino")  # refused at start


def test_unknown_calls_are_not_claimed():
    from modules.pipeline.ov_backend import DecoderAdapter, UNetAdapter

    z = torch.zeros(1, 4, 8, 8)
    assert UNetAdapter.inputs((z, torch.ones(1), torch.zeros(1, 77, 8)), {"return_dict": False}) is not None
    assert UNetAdapter.inputs((z, torch.ones(1), torch.zeros(1, 77, 8)), {}) is None  # return_dict=True
    residual = {"return_dict": False, "mid_block_additional_residual": z}
    assert UNetAdapter.inputs((z, torch.ones(1), torch.zeros(1, 77, 8)), residual) is None  # ControlNet
    assert DecoderAdapter.inputs((z,), {}) == {"z": z}
    assert DecoderAdapter.inputs((z, z), {}) is None


@needs_openvino
def test_bf16_decoder_matches_eager_bf16(setup, tmp_path):
    """bf16 weights are traced in fp32 (an IR traced from bf16 gave NaNs) and run with the bf16 hint here."""
    from modules.pipeline.ov_backend import use_openvino

    decoder = setup[0].models.current.vae.decoder
    module = copy.deepcopy(decoder).to(torch.bfloat16).eval()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want = module(z).float()
        runner = use_openvino(module, "vae_decoder", tmp_path, None, torch.bfloat16)
        got = module(z)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert psnr(got.float().clamp(-1, 1).numpy() * 127.5, want.clamp(-1, 1).numpy() * 127.5) >= 30
    assert runner.conversions == 1 and all(t.dtype == torch.bfloat16 for t in module.state_dict().values())
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())  # round trip is exact
