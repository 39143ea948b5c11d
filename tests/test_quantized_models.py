"""Quantized models end to end: GGUF UNets and FLUX transformers, fp8 files and --weights fp8, LoRA on
packed weights, and bad files. Every file is written by tests/fixtures/make_tiny_gguf.py with the `gguf`
package and torch, never by the loader; the float files they come from are the references."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.checkpoints import quantized
from modules.checkpoints.packed import packed_weight
from modules.errors import CheckpointError
from modules.infotext import parse
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint, save_safetensors_deterministic
from tests.fixtures.make_tiny_gguf import (
    finish,
    make_sd1_split,
    make_sdxl_split,
    quantized_fraction,
    save_fp8_file,
    scaled_fp8,
    write_gguf,
)
from tests.fixtures.make_tiny_mmdit import MMDiTWidths, fill, flux_shapes, make_split_files

# A FLUX transformer wide enough (hidden 256, MLP 1024) that Q4_K's 256-weight super-blocks fill its rows.
WIDE_FLUX = MMDiTWidths(hidden=256, heads=4, depth=1, single_depth=1)
PARAMS = dict(prompt="a red fox", steps=2, width=64, height=64, seed=11, save_images=False, sampler_name="Euler")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


_IMAGES: dict[tuple, tuple[np.ndarray, str]] = {}  # (engine, model, prompt) -> image, infotext: each made once


def generate(engine, name: str, **kw) -> tuple[np.ndarray, str]:
    key = (id(engine), name, tuple(sorted(kw.items())))
    engine.load_model(name)
    if key not in _IMAGES:
        result = engine.txt2img(Txt2ImgParams(**{**PARAMS, **kw}))
        _IMAGES[key] = np.asarray(result.images[0]), result.infotexts[0]
    return _IMAGES[key]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """models/: the tiny SDXL checkpoint, and its UNet alone as F32 and Q8_0 GGUF with split CLIPs and VAE."""
    root = tmp_path_factory.mktemp("q-sdxl")
    make_tiny_checkpoint("sdxl", root / "models" / "Stable-diffusion" / "full-sdxl.safetensors")
    for qtype in ("F32", "Q8_0"):
        make_sdxl_split(root / "models", qtype)
    return make_engine(root), root


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """models/: a wide tiny FLUX.1-schnell transformer as bf16 safetensors, GGUF Q8_0 / Q4_K and scaled fp8."""
    root = tmp_path_factory.mktemp("q-flux")
    models = root / "models"
    split = make_split_files("flux-schnell", root / "split")
    (models / "text_encoder").mkdir(parents=True)
    (models / "VAE").mkdir()
    shutil.copy(split["clip_l"], models / "text_encoder" / "clip_l.safetensors")
    shutil.copy(split["t5xxl"], models / "text_encoder" / "t5xxl_fp16.safetensors")
    shutil.copy(split["vae"], models / "VAE" / "ae.safetensors")
    transformer = fill(flux_shapes(WIDE_FLUX, guidance=False), seed=5, dtype=torch.bfloat16)
    (models / "unet").mkdir()
    save_safetensors_deterministic(transformer, models / "unet" / "flux1-schnell-bf16.safetensors", {})
    for qtype in ("Q8_0", "Q4_K"):
        write_gguf(models / "unet" / f"flux1-schnell-{qtype}.gguf", transformer, qtype, "flux")
    save_fp8_file(scaled_fp8(transformer), models / "unet" / "flux1-schnell-fp8_e4m3fn_scaled.safetensors")
    return make_engine(root), root, transformer


# ---------------------------------------------------------------- SDXL UNet GGUF

def test_sdxl_gguf_unet_with_split_parts_matches_the_checkpoint(sdxl) -> None:
    engine, _ = sdxl
    full, _ = generate(engine, "full-sdxl")
    f32, _ = generate(engine, "tiny-sdxl-F32")
    assert np.array_equal(full, f32)  # the same weights, found through clip_l / clip_g / sdxl_vae files
    q8, info = generate(engine, "tiny-sdxl-Q8_0")
    model = engine.require_model()
    assert model.weight_dtype == "Q8_0" and model.modules == ("sdxl_vae", "clip_l", "clip_g")
    conv = model.unet.down_blocks[1].resnets[0].conv1
    assert packed_weight(conv).format == "Q8_0"
    assert conv.parametrizations.weight.original.dtype == torch.uint8  # blocks in memory, not floats
    # Q8_0 keeps each weight to 1/254 of its 32-block's largest magnitude (~0.5% RMS of a Gaussian block);
    # through a few layers that is ~1% of the image's range: 39.8 dB measured. 30 dB leaves room and fails
    # for any real mistake (a wrong scale, a transposed block), which lands far below 20 dB.
    assert not np.array_equal(q8, f32) and psnr(q8, f32) >= 30
    fields = parse(info)
    assert fields["Weight dtype"] == "Q8_0" and fields["Module 1"] == "sdxl_vae"


def test_lora_on_a_quantized_unet_changes_the_image_and_reverts_exactly(sdxl) -> None:
    engine, root = sdxl
    before, _ = generate(engine, "tiny-sdxl-Q8_0")
    model = engine.require_model()
    layers = mk.module_layers(model.unet, "lora_unet_")
    mk.write(mk.lora_tensors(layers, seed=3), root / "models" / "Lora" / "q.safetensors")
    conv = model.unet.down_blocks[1].resnets[0].conv1
    storage = conv.parametrizations.weight.original.clone()
    with_lora, info = generate(engine, "tiny-sdxl-Q8_0", prompt="a red fox <lora:q:1>")
    after = np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])
    assert "Lora hashes" in info and not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)
    assert torch.equal(conv.parametrizations.weight.original, storage)  # the packed blocks were never written


# ---------------------------------------------------------------- FLUX GGUF and fp8

def test_flux_gguf_quants_are_close_to_bf16(flux) -> None:
    engine, _, transformer = flux
    ref, _ = generate(engine, "flux1-schnell-bf16")
    assert quantized_fraction(transformer, "Q4_K") > 0.9  # the wide model really is mostly Q4_K
    q8, info = generate(engine, "flux1-schnell-Q8_0")
    assert engine.require_model().weight_dtype == "Q8_0" and parse(info)["Weight dtype"] == "Q8_0"
    assert psnr(q8, ref) >= 30  # as for SDXL: Q8_0's ~0.5% weight error; measured 47 dB here
    q4, _ = generate(engine, "flux1-schnell-Q4_K")
    assert engine.require_model().weight_dtype == "Q4_K"
    # Q4_K: 16 levels per 32 weights with 6-bit sub-block scales; the fixture's min/max quantizer leaves ~8% RMS
    # weight error (llama.cpp's ~4%): 24.9 dB measured on this model. 18 dB is the stated bound, with room
    # for other seeds; a broken k-quant decode (wrong scale bits, swapped nibbles) gives under 10 dB.
    assert psnr(q4, ref) >= 18 and psnr(q4, ref) < psnr(q8, ref)


def test_scaled_fp8_file_stays_fp8_and_upcasts_with_its_scale(flux) -> None:
    engine, _, transformer = flux
    ref, _ = generate(engine, "flux1-schnell-bf16")
    fp8, info = generate(engine, "flux1-schnell-fp8_e4m3fn_scaled")
    model = engine.require_model()
    assert model.weight_dtype == "fp8_e4m3fn" and parse(info)["Weight dtype"] == "fp8_e4m3fn"
    layer = model.unet.transformer_blocks[0].ff.net[2]
    assert layer.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    source = transformer["double_blocks.0.img_mlp.2.weight"].float()
    scale = source.abs().max() / 448
    torch.testing.assert_close(layer.weight, (source / scale).to(torch.float8_e4m3fn).float() * scale)
    # e4m3 keeps 3 mantissa bits (~2-3% RMS per weight, the scale puts the largest weight at 448):
    # 31.7 dB measured; 25 dB is the bound. Ignoring the scale would leave weights 448/max|W| too large.
    assert psnr(fp8, ref) >= 25


def test_weights_fp8_stores_a_float_checkpoint_as_fp8(sdxl, tmp_path) -> None:
    _, root = sdxl
    engine = make_engine(tmp_path, weights="fp8", models_dir=root / "models")
    image, info = generate(engine, "full-sdxl")
    model = engine.require_model()
    assert model.weight_dtype == "fp8_e4m3fn" and model.fp8_weight == "Enable"
    assert model.unet.down_blocks[1].resnets[0].conv1.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    fields = parse(info)
    assert fields["FP8 weight"] == "Enable" and fields["Weight dtype"] == "fp8_e4m3fn"
    plain, _ = generate(sdxl[0], "full-sdxl")
    # unscaled e4m3 (A1111's setting): the tiny model's small weights (~0.06) reach the subnormal range,
    # so this bound is Q4_K's 18 dB rather than the scaled file's 25
    assert psnr(image, plain) >= 18 and not np.array_equal(image, plain)


def test_sd1_unet_and_sd35_transformer_gguf_equal_their_float_files(tmp_path) -> None:
    """F32 GGUF holds the float weights exactly: the image must be the float file's, bit for bit."""
    sd1, sd3 = tmp_path / "sd1", tmp_path / "sd3"
    make_tiny_checkpoint("sd1", sd1 / "models" / "Stable-diffusion" / "full-sd1.safetensors")
    make_sd1_split(sd1 / "models", "F32")
    engine = make_engine(sd1)
    assert np.array_equal(generate(engine, "full-sd1")[0], generate(engine, "tiny-sd1-F32")[0])
    assert engine.require_model().modules == ("vae-ft-mse-840000-ema-pruned", "clip_l")

    split = make_split_files("sd35-medium", tmp_path / "split")
    folder = sd3 / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    shutil.copy(split["transformer"], folder / "sd3.5-medium-fp16.safetensors")
    transformer = quantized.read_weights(split["transformer"])
    write_gguf(folder / "sd3.5-medium-F32.gguf", transformer, "F32", "sd3")
    write_gguf(folder / "sd3.5-medium-Q8_0.gguf", transformer, "Q8_0", "sd3")
    for sub, names in (("text_encoder", ("clip_l", "clip_g", "t5xxl")), ("VAE", ("vae",))):
        (sd3 / "models" / sub).mkdir()
        for name in names:
            shutil.copy(split[name], sd3 / "models" / sub / (split[name].name if name != "vae" else "sd3_vae.safetensors"))
    engine = make_engine(sd3)
    assert np.array_equal(generate(engine, "sd3.5-medium-fp16")[0], generate(engine, "sd3.5-medium-F32")[0])
    engine.load_model("sd3.5-medium-Q8_0")
    model = engine.require_model()
    assert model.spec.arch == "sd35-medium" and model.weight_dtype == "Q8_0"
    assert packed_weight(model.unet.transformer_blocks[0].attn.to_q).format == "Q8_0"  # fused qkv split packed


# ---------------------------------------------------------------- bad files keep the old model

def keeps_old_model(engine, old) -> None:
    """The model loaded before a failed load is still current and still generates."""
    assert engine.models.current is old
    assert engine.txt2img(Txt2ImgParams(**PARAMS)).images[0].size == (64, 64)


def test_bad_quantized_files_are_named_and_keep_the_old_model(sdxl, monkeypatch) -> None:
    engine, root = sdxl
    engine.load_model("tiny-sdxl-Q8_0")
    old = engine.require_model()
    unet = root / "models" / "unet"
    good = (unet / "tiny-sdxl-Q8_0.gguf").read_bytes()
    (unet / "cut-sdxl.gguf").write_bytes(good[: len(good) - 4096])
    with pytest.raises(CheckpointError, match=r"cut-sdxl.gguf.*(truncated|not a readable GGUF)"):
        engine.load_model("cut-sdxl")
    keeps_old_model(engine, old)

    from gguf import GGMLQuantizationType, GGUFWriter
    writer = GGUFWriter(str(unet / "iq-sdxl.gguf"), "sdxl")
    writer.add_tensor("input_blocks.0.0.weight", np.zeros((32, 36), dtype=np.uint8),
                      raw_dtype=GGMLQuantizationType.IQ4_NL)  # 32 rows of 64 weights: 2 blocks of 18 bytes
    finish(writer)
    with pytest.raises(CheckpointError, match=r"iq-sdxl.gguf: tensor input_blocks.0.0.weight uses GGUF "
                                              r"quantization IQ4_NL, which Atelier does not read"):
        engine.load_model("iq-sdxl")
    keeps_old_model(engine, old)

    shutil.copy(unet / "tiny-sdxl-Q8_0.gguf", unet / "flux1-dev-Q8_0.gguf")
    with pytest.raises(CheckpointError, match=r"flux1-dev-Q8_0.gguf: its name says FLUX, but its tensors are an "
                                              r"SDXL UNet"):
        engine.load_model("flux1-dev-Q8_0")
    keeps_old_model(engine, old)


def test_fp8_without_float8_and_nf4_with_a_corrupt_state(sdxl, flux, monkeypatch) -> None:
    engine, _ = sdxl
    engine.load_model("tiny-sdxl-Q8_0")
    old = engine.require_model()
    fp8_file = flux[1] / "models" / "unet" / "flux1-schnell-fp8_e4m3fn_scaled.safetensors"
    monkeypatch.setattr(quantized, "fp8_supported", lambda: False)  # a torch build without float8
    with pytest.raises(CheckpointError, match=r"flux1-schnell-fp8_e4m3fn_scaled.safetensors stores fp8 weights, "
                                              r"but this torch .* has no float8 types"):
        engine.load_model(fp8_file)
    keeps_old_model(engine, old)
    monkeypatch.undo()

    nf4 = Path(flux[1]) / "flux1-dev-bnb-nf4.safetensors"
    save_fp8_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(64, 1, dtype=torch.uint8),
                   "model.diffusion_model.double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4":
                       torch.zeros(8, dtype=torch.uint8)}, nf4)
    # NF4 loads without bitsandbytes (tests/test_nf4.py); a quant state that is not JSON is named
    with pytest.raises(CheckpointError, match=r"flux1-dev-bnb-nf4.safetensors: the quant_state of "
                                              r"model.diffusion_model.double_blocks.0.img_attn.qkv.weight is not valid"):
        engine.load_model(nf4)
    keeps_old_model(engine, old)


# ---------------------------------------------------------------- over HTTP

def test_api_lists_formats_takes_fp8_storage_and_refuses_a_bad_gguf(sdxl, tmp_path) -> None:
    import httpx

    from tests.api_server import start_server

    _, root = sdxl
    srv = start_server(tmp_path, {"full-sdxl": root / "models" / "Stable-diffusion" / "full-sdxl.safetensors"})
    models = tmp_path / "models"
    for sub in ("text_encoder", "VAE", "unet"):
        shutil.copytree(root / "models" / sub, models / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("cut-*", "iq-*", "flux1-*"))
    good = (models / "unet" / "tiny-sdxl-Q8_0.gguf").read_bytes()
    (models / "unet" / "broken-sdxl.gguf").write_bytes(good[:2048])
    try:
        listed = {m["model_name"]: m for m in httpx.get(f"{srv.url}/sdapi/v1/sd-models", timeout=30).json()}
        assert listed["tiny-sdxl-Q8_0"]["weight_dtype"] == "Q8_0" and listed["full-sdxl"]["weight_dtype"] == "fp16"
        body = {**PARAMS, "override_settings": {"sd_model_checkpoint": "tiny-sdxl-Q8_0"}}
        body.pop("save_images")
        reply = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert reply.status_code == 200 and "Weight dtype: Q8_0" in reply.json()["info"]
        body["override_settings"] = {"sd_model_checkpoint": "full-sdxl", "fp8_storage": "Enable"}
        info = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300).json()["info"]
        assert "FP8 weight: Enable" in info and "Weight dtype: fp8_e4m3fn" in info
        bad = httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": "broken-sdxl"}, timeout=60)
        assert 400 <= bad.status_code < 500 and "broken-sdxl.gguf" in bad.text
        body["override_settings"] = {"fp8_storage": "Enable"}  # the loaded model still generates
        assert httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("name, fmt", [("flux1-schnell-Q8_0", "Q8_0"), ("flux1-schnell-fp8_e4m3fn_scaled", "fp8_e4m3fn")])
def test_kohya_flux_lora_on_packed_transformers(flux, name: str, fmt: str) -> None:
    """A kohya FLUX.1 LoRA (fused qkv / linear1, original names) on a GGUF or fp8 transformer: the job's weights
    are the packed layer's float weights plus the LoRA rows, the image follows the bf16 model's with the same
    LoRA, and the packed blocks are never written."""
    from tests.test_flow_lora import _lora_delta, _originals

    engine, root, transformer = flux
    hidden = WIDE_FLUX.hidden
    layers = _originals({k: tuple(v.shape) for k, v in transformer.items()}, "lora_unet_", dotted=False)
    layers = {k: v for k, v in layers.items() if k.endswith(("img_attn_qkv", "linear1"))}
    sd = mk.lora_tensors(layers, seed=4)
    mk.write(sd, root / "models" / "Lora" / "fq.safetensors")
    prompt = "a red fox <lora:fq:0.8>"
    ref_lora, _ = generate(engine, "flux1-schnell-bf16", prompt=prompt)
    ref, _ = generate(engine, "flux1-schnell-bf16")
    before, _ = generate(engine, name)
    model = engine.require_model()
    assert model.weight_dtype == fmt
    to_q = model.unet.transformer_blocks[0].attn.to_q
    storage = to_q.parametrizations.weight.original.clone()
    base = to_q.weight.detach().float().clone()
    hooks = engine.job_hooks("txt2img")
    patch = hooks.patch(model, hooks.prepare(Txt2ImgParams(**{**PARAMS, "prompt": prompt})))
    delta = _lora_delta(sd, "lora_unet_double_blocks_0_img_attn_qkv")[:hidden]
    with patch.applied():
        torch.testing.assert_close(patch.weight("unet", "transformer_blocks.0.attn.to_q").float(), base + 0.8 * delta,
                                   rtol=1e-3, atol=1e-3)
    with_lora, info = generate(engine, name, prompt=prompt)
    after = np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])
    assert "Lora hashes" in info and not np.array_equal(before, with_lora)
    assert np.array_equal(before, after) and torch.equal(to_q.parametrizations.weight.original, storage)
    # the LoRA moves the packed model's image as it moves the bf16 one's: closer to bf16 + LoRA than to bf16
    assert psnr(with_lora, ref_lora) >= 25 and psnr(with_lora, ref_lora) > psnr(with_lora, ref)
