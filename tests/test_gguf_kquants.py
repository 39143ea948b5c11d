"""Every GGUF type Atelier reads, through a real file: blocks built by the test (random quants with sane
float16 scales, since gguf-py cannot quantize k-quants), written with gguf.GGUFWriter as raw data, read by
Atelier's reader and compared with gguf's own dequantizer; and a tiny FLUX.1 transformer stored in the
k-quant types that loads, stays packed and generates the image of its dequantized float weights."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from modules.checkpoints.gguf_file import read_gguf
from modules.checkpoints.packed import PackedTensor, packed_weight
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures.make_tiny_checkpoint import save_safetensors_deterministic
from tests.fixtures.make_tiny_gguf import K_SCALES, finish, random_k_blocks, write_k_quant_gguf
from tests.fixtures.make_tiny_mmdit import MMDiTWidths, fill, flux_shapes, make_split_files
from tests.test_gguf_quant import random_blocks

ALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K")
K_TYPES = tuple(K_SCALES)  # Q6_K, Q5_K, Q4_K, Q3_K, Q2_K
WIDE_FLUX = MMDiTWidths(hidden=256, heads=4, depth=1, single_depth=1)  # rows of whole 256-weight super-blocks
PARAMS = dict(prompt="a red fox", steps=1, width=64, height=64, seed=11, save_images=False, sampler_name="Euler")


def _stored(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """The bytes (or floats) a file holds for a (rows, cols) tensor of type `name`."""
    floats = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if name == "F32":
        return floats
    if name in ("F16", "BF16"):
        return quants.quantize(floats, GGMLQuantizationType[name])
    block = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    return random_blocks(name, rows * cols // block, seed).reshape(rows, -1)


def test_every_type_in_a_gguf_file_restores_exactly_as_gguf(tmp_path) -> None:
    path = tmp_path / "all-types.gguf"
    writer = GGUFWriter(str(path), "flux")
    for i, name in enumerate(ALL_TYPES):
        data = _stored(name, rows=3, cols=512, seed=i)
        raw = None if name in ("F32", "F16") else GGMLQuantizationType[name]
        writer.add_tensor(f"t.{name}.weight", data, raw_dtype=raw)
    finish(writer)

    expected = {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(3, 512)
                for t in GGUFReader(str(path)).tensors}
    contents = read_gguf(path)
    assert contents.formats == dict.fromkeys(ALL_TYPES, 1)
    for name in ALL_TYPES:
        tensor = contents.tensors[f"t.{name}.weight"]
        assert tuple(tensor.shape) == (3, 512)
        if name in ("F32", "F16", "BF16"):
            got = tensor.float()
        else:  # kept packed until a layer restores it
            assert isinstance(tensor, PackedTensor) and tensor.storage.dtype == torch.uint8
            got = tensor.restore(torch.float32)
        np.testing.assert_array_equal(got.numpy(), expected[f"t.{name}.weight"].astype(np.float32), err_msg=name)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_random_k_blocks_have_the_asked_spread(qtype) -> None:
    blocks = random_k_blocks(8, 512, qtype, 0.05, np.random.default_rng(0))
    restored = quants.dequantize(blocks, GGMLQuantizationType[qtype])
    assert np.isfinite(restored).all() and abs(restored.std() - 0.05) < 0.005 and abs(restored.mean()) < 0.01


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_flux_transformer_in_k_quants_generates_its_dequantized_image(tmp_path) -> None:
    models = tmp_path / "models"
    split = make_split_files("flux-schnell", tmp_path / "split")
    for sub, part, name in (("text_encoder", "clip_l", "clip_l.safetensors"),
                            ("text_encoder", "t5xxl", "t5xxl_fp16.safetensors"), ("VAE", "vae", "ae.safetensors")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(split[part], models / sub / name)
    transformer = fill(flux_shapes(WIDE_FLUX, guidance=False), seed=5, dtype=torch.float32)
    restored = write_k_quant_gguf(models / "unet" / "flux1-schnell-K.gguf", transformer, "flux", K_TYPES)
    save_safetensors_deterministic(restored, models / "unet" / "flux1-schnell-dequantized.safetensors", {})
    engine = make_engine(tmp_path)

    engine.load_model("flux1-schnell-K")
    formats = {packed_weight(m).format for m in engine.require_model().unet.modules() if packed_weight(m)}
    assert formats == set(K_TYPES)  # every k-quant is in the loaded model, still packed
    quantized = np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])
    engine.load_model("flux1-schnell-dequantized")
    reference = np.asarray(engine.txt2img(Txt2ImgParams(**PARAMS)).images[0])
    assert quantized.std() > 1  # a real image, not a constant one from broken weights
    # The same restored weights in the same compute dtype: the images are identical (measured: PSNR infinite). The
    # stated bound, 50 dB, allows only rounding-order noise; a wrong bit field or block order in any of the
    # five decoders changes that layer's weights entirely and lands below 20 dB.
    assert psnr(quantized, reference) >= 50
