"""GGUF T5 text encoders (llama.cpp's names, as city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`): written by
tests/fixtures/make_tiny_gguf.py with gguf-py's own T5 name map and quantizer, never by the loader;
transformers' T5EncoderModel on the dequantized weights is the reference."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

from modules.checkpoints.components import ComponentChoice
from modules.checkpoints.families import FAMILIES
from modules.checkpoints.gguf_t5 import read_t5_gguf
from modules.checkpoints.mmdit import build_hf_encoder
from modules.checkpoints.packed import packed_weight
from modules.errors import CheckpointError
from modules.pipeline.params import Txt2ImgParams
from tests.api_server import start_server
from tests.conftest import make_engine
from tests.fixtures.make_tiny_checkpoint import save_safetensors_deterministic
from tests.fixtures.make_tiny_gguf import write_gguf, write_t5_gguf
from tests.fixtures.make_tiny_mmdit import component_state_dicts, make_split_files

T5_GGUF = "t5-v1_1-xxl-encoder-Q8_0.gguf"
PARAMS = dict(prompt="a red fox", steps=2, width=64, height=64, seed=11, save_images=False, sampler_name="Euler")
TINY_T5 = dict(vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
               use_cache=False, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)


def test_t5_gguf_encodes_as_transformers_on_its_dequantized_weights(tmp_path) -> None:
    torch.manual_seed(0)
    source = T5EncoderModel(T5Config(**TINY_T5)).eval()
    state = {k: v for k, v in source.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    restored = write_t5_gguf(tmp_path / T5_GGUF, state, "Q8_0")
    reference = T5EncoderModel(T5Config(**TINY_T5)).eval()
    reference.load_state_dict({**restored, "encoder.embed_tokens.weight": restored["shared.weight"]})

    encoder, config = build_hf_encoder(read_t5_gguf(tmp_path / T5_GGUF), "t5xxl", FAMILIES["flux-schnell"],
                                       device=torch.device("cpu"), dtype=torch.float32)
    q = encoder.encoder.block[1].layer[0].SelfAttention.q
    assert packed_weight(q).format == "Q8_0" and q.parametrizations.weight.original.dtype == torch.uint8
    assert config["d_model"] == 32 and config["num_layers"] == 2
    ids = torch.tensor([[37, 1782, 4, 9, 250, 31000, 1, 0, 0]])
    with torch.no_grad():
        got = encoder(input_ids=ids).last_hidden_state
        want = reference(input_ids=ids).last_hidden_state
        plain = source(input_ids=ids).last_hidden_state
    # Both run fp32 on the same restored weights (Atelier's torch dequantizer is bit-exact with gguf's), so
    # only summation order may differ: 1e-5 of outputs of size ~1 (T5's final RMS norm) is far below the
    # Q8_0 rounding itself, which moves the output by up to 0.035 here (checked below: the test sees it).
    # Measured: bit-identical.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_t5_gguf_of_a_whole_t5_drops_the_decoder(tmp_path) -> None:
    torch.manual_seed(1)
    state = {k: v for k, v in T5EncoderModel(T5Config(**TINY_T5)).state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    write_t5_gguf(tmp_path / "t5-q8.gguf", state, "Q8_0", arch="t5")
    tensors = read_t5_gguf(tmp_path / "t5-q8.gguf")
    assert set(tensors) == set(state)


@pytest.fixture(scope="module")
def flux_t5(tmp_path_factory):
    """models/: tiny FLUX.1-schnell split files whose T5 is only a Q8_0 GGUF in llama.cpp's layout, plus the
    same T5 restored to fp32 safetensors (the reference) and a FLUX transformer GGUF misfiled as text encoder."""
    root = tmp_path_factory.mktemp("t5-gguf")
    models = root / "models"
    split = make_split_files("flux-schnell", root / "split")
    te, vae, unet = models / "text_encoder", models / "VAE", models / "unet"
    for folder in (te, vae, unet):
        folder.mkdir(parents=True)
    shutil.copy(split["clip_l"], te / "clip_l.safetensors")
    shutil.copy(split["vae"], vae / "ae.safetensors")
    shutil.copy(split["transformer"], unet / "flux1-schnell-tiny.safetensors")
    t5 = component_state_dicts("flux-schnell")["t5xxl"]
    restored = write_t5_gguf(te / T5_GGUF, t5, "Q8_0")
    save_safetensors_deterministic(restored, root / "t5xxl_dequantized_fp32.safetensors", {})
    transformer = component_state_dicts("flux-schnell")["transformer"]
    write_gguf(te / "flux1-schnell-Q8_0.gguf", transformer, "Q8_0", "flux")
    return root


def _image(engine, name: str, modules: tuple[str, ...] = ()) -> np.ndarray:
    engine.load_model(name, ComponentChoice(modules=modules))
    return np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])


def test_flux_job_with_a_t5_gguf_equals_its_dequantized_float_t5(flux_t5) -> None:
    root = flux_t5
    engine = make_engine(root)
    with_gguf = _image(engine, "flux1-schnell-tiny")  # found by name: t5-v1_1-xxl-encoder-*.gguf
    model = engine.require_model()
    assert model.modules[-1] == T5_GGUF.removesuffix(".gguf")
    t5 = next(m for m in model.text_encoders if isinstance(m, T5EncoderModel))
    wi = t5.encoder.block[0].layer[1].DenseReluDense.wi_0
    assert packed_weight(wi).format == "Q8_0"  # blocks in memory, restored per layer
    copy = shutil.copy(root / "t5xxl_dequantized_fp32.safetensors", root / "models" / "text_encoder")
    try:
        reference = _image(engine, "flux1-schnell-tiny", ("t5xxl_dequantized_fp32.safetensors",))
    finally:
        Path(copy).unlink()  # the module's other tests find the GGUF by name
    # The same restored weights in the same compute dtype: the images are identical.
    assert np.array_equal(with_gguf, reference)


def test_a_transformer_gguf_given_as_t5_is_named_and_the_old_model_stays(flux_t5) -> None:
    root = flux_t5
    engine = make_engine(root)
    before = _image(engine, "flux1-schnell-tiny", (T5_GGUF,))
    loaded = engine.require_model()
    te = root / "models" / "text_encoder"
    # picked in the VAE / Text Encoder picker, or named like a T5 and found first by name
    for misfiled, picked in (("flux1-schnell-Q8_0.gguf", True), ("t5-v1_1-xxl-a-Q8_0.gguf", False)):
        if not (te / misfiled).exists():
            shutil.copy(te / "flux1-schnell-Q8_0.gguf", te / misfiled)
        if not picked:  # the misfiled file is then the only T5 found by name (two would be ambiguous)
            (te / T5_GGUF).rename(root / "aside.gguf")
        try:
            with pytest.raises(CheckpointError) as err:
                engine.load_model("flux1-schnell-tiny", ComponentChoice(modules=(misfiled,) if picked else ()))
        finally:
            if not picked:
                (root / "aside.gguf").rename(te / T5_GGUF)
        message = str(err.value)
        assert f"{misfiled} was given as the T5 text encoder, but it is a GGUF of architecture 'flux' (a FLUX.1 " \
               "transformer), not a T5 encoder (architecture 't5encoder'" in message
        assert engine.require_model() is loaded  # refused from the headers, before the old model was released
    (te / "t5-v1_1-xxl-a-Q8_0.gguf").unlink()
    misplaced = shutil.copy(te / T5_GGUF, root / "models" / "unet" / "t5-encoder-in-unet-Q8_0.gguf")
    try:
        with pytest.raises(CheckpointError, match="t5-encoder-in-unet-Q8_0.gguf is a T5 text encoder .*"
                                                  "put it in models/text_encoder"):
            engine.load_model("t5-encoder-in-unet-Q8_0")
    finally:
        Path(misplaced).unlink()
    assert engine.require_model() is loaded
    assert np.array_equal(_image(engine, "flux1-schnell-tiny", (T5_GGUF,)), before)


def test_api_lists_t5_ggufs_and_refuses_a_misfiled_one(flux_t5, tmp_path) -> None:
    flux = flux_t5 / "models" / "unet" / "flux1-schnell-tiny.safetensors"
    srv = start_server(tmp_path, {"flux": flux})
    shutil.copytree(flux_t5 / "models" / "text_encoder", tmp_path / "models" / "text_encoder", dirs_exist_ok=True)
    shutil.copytree(flux_t5 / "models" / "VAE", tmp_path / "models" / "VAE", dirs_exist_ok=True)
    try:
        listed = {m["model_name"] for m in httpx.get(f"{srv.url}/sdapi/v1/sd-modules", timeout=30).json()}
        assert T5_GGUF in listed
        ok = httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": "flux",
                                                              "forge_additional_modules": [T5_GGUF]}, timeout=300)
        assert ok.status_code == 200
        bad = httpx.post(f"{srv.url}/sdapi/v1/options",
                         json={"forge_additional_modules": ["flux1-schnell-Q8_0.gguf"]}, timeout=60)
        assert bad.status_code == 422 and "flux1-schnell-Q8_0.gguf" in bad.text and "t5encoder" in bad.text
        body = {k: v for k, v in PARAMS.items() if k != "save_images"}
        assert httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300).status_code == 200
    finally:
        srv.stop()


def test_lora_on_a_t5_gguf_changes_the_image_and_reverts_exactly(flux_t5) -> None:
    from tests.fixtures import make_tiny_lora as mk

    engine = make_engine(flux_t5)
    before = _image(engine, "flux1-schnell-tiny")
    t5 = next(m for m in engine.require_model().text_encoders if isinstance(m, T5EncoderModel))
    layers = mk.select(mk.module_layers(t5, "lora_te3_"), ["SelfAttention_q", "SelfAttention_v"])
    mk.write(mk.lora_tensors(layers, seed=3), flux_t5 / "models" / "Lora" / "t5q.safetensors")
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    storage = q.parametrizations.weight.original.clone()
    with_lora = engine.txt2img(Txt2ImgParams(**{**PARAMS, "prompt": "a red fox <lora:t5q:4>"}))
    after = np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])
    assert "Lora hashes" in with_lora.infotexts[0] and not np.array_equal(np.asarray(with_lora.images[0]), before)
    assert np.array_equal(after, before)
    assert torch.equal(q.parametrizations.weight.original, storage)  # the Q8_0 blocks were never written


def test_a_t5_gguf_too_narrow_for_the_transformer_is_named(flux_t5, tmp_path) -> None:
    """SD3.5's tiny transformer needs a 64-wide T5; the FLUX fixture's GGUF is 32 wide: refused from headers."""
    split = make_split_files("sd35-large", tmp_path / "split")
    models = tmp_path / "models"
    (models / "text_encoder").mkdir(parents=True)
    (models / "VAE").mkdir()
    (models / "unet").mkdir()
    for part in ("clip_l", "clip_g"):
        shutil.copy(split[part], models / "text_encoder" / f"{part}.safetensors")
    shutil.copy(flux_t5 / "models" / "text_encoder" / T5_GGUF, models / "text_encoder" / T5_GGUF)
    shutil.copy(split["vae"], models / "VAE" / "sd3_vae.safetensors")
    shutil.copy(split["transformer"], models / "unet" / "sd3.5_large_tiny.safetensors")
    engine = make_engine(tmp_path)
    with pytest.raises(CheckpointError, match=f"The T5 text encoder {T5_GGUF} is 32 wide, but this SD3.5 Large "
                                              "transformer needs a 64-wide T5"):
        engine.load_model("sd3.5_large_tiny")
