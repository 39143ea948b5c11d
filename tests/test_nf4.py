"""bitsandbytes NF4 / FP4 checkpoints (Forge's `flux1-dev-bnb-nf4`, bnb-nf4 SDXL files): read without
bitsandbytes, kept 4-bit in memory, dequantized per layer in torch. Files are written by
tests/fixtures/make_tiny_nf4.py with bitsandbytes itself, which is also the reference dequantizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modules.checkpoints import quantized
from modules.checkpoints.packed import PackedTensor, packed_weight
from modules.errors import CheckpointError
from modules.infotext import parse
from modules.pipeline.params import Txt2ImgParams
from tests.conftest import make_engine
from tests.fixtures import make_tiny_lora as mk
from tests.fixtures.make_tiny_checkpoint import make_tiny_checkpoint, tiny_state_dict
from tests.fixtures.make_tiny_mmdit import all_in_one, make_all_in_one
from tests.fixtures.make_tiny_nf4 import dequantized_reference, quantize_linear_weights, save
from tests.test_quantized_models import PARAMS, keeps_old_model

pytest.importorskip("bitsandbytes")  # the reference (Atelier itself does not need it)

UNET = "model.diffusion_model."


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def image(engine, name: str, **kw) -> tuple[np.ndarray, str]:
    engine.load_model(name)
    result = engine.txt2img(Txt2ImgParams(**{**PARAMS, **kw}))
    return np.asarray(result.images[0]), result.infotexts[0]


# ---------------------------------------------------------------- the dequantizer against bitsandbytes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_dequantized_weights_equal_bitsandbytes(tmp_path, dtype, quant_type, nested) -> None:
    gen = torch.Generator().manual_seed(1)
    source = {"m.rows.weight": torch.randn(48, 128, generator=gen),  # whole blocks per row
              "m.short.weight": torch.randn(96, 32, generator=gen),  # rows shorter than a block
              "m.ragged.weight": torch.randn(33, 7, generator=gen),  # the last block is short
              "m.ragged.bias": torch.randn(33, generator=gen)}
    source = {k: v.to(dtype) for k, v in source.items()}
    tensors = quantize_linear_weights(source, "m.", quant_type, nested)
    path = save(tensors, tmp_path / f"x-bnb-{quant_type}.safetensors")
    sd = quantized.read_weights(path, dtype=torch.float16)
    for key in ("m.rows.weight", "m.short.weight", "m.ragged.weight"):
        packed = sd[key]
        assert isinstance(packed, PackedTensor) and packed.format == quant_type.upper()
        assert packed.storage.dtype == torch.uint8 and packed.shape == tuple(source[key].shape)
        # float32 products rounded once to `dtype`, as bitsandbytes does: bit-identical, no ulp allowed
        assert torch.equal(packed.restore(dtype), dequantized_reference(tensors, key)), key
    assert sd["m.ragged.bias"].dtype == torch.float16 and len(sd) == 4  # scales and states are consumed
    assert quantized.file_weight_format(path) == quant_type


def test_split_and_joined_weights_keep_their_scales(tmp_path) -> None:
    """FLUX's fused qkv / linear1 are split along rows while packed: part i restores rows i of the whole.
    Parts of 1024 weights (16 blocks) start inside double quantization's 256-block groups."""
    tensors = quantize_linear_weights({"qkv.weight": torch.randn(96, 32)}, "", "nf4", nested=True)
    whole = quantized.read_weights(save(tensors, tmp_path / "qkv.safetensors"))["qkv.weight"]
    ref = dequantized_reference(tensors, "qkv.weight")
    parts = whole.split([32, 48, 16])
    assert [torch.equal(p.restore(torch.float32), r) for p, r in zip(parts, ref.split([32, 48, 16]), strict=True)] \
        == [True, True, True]
    swapped = PackedTensor.cat([parts[2], parts[0]])
    assert torch.equal(swapped.restore(torch.float32), torch.cat([ref[80:], ref[:32]]))
    with pytest.raises(CheckpointError, match="64-element blocks"):
        whole.split([1, 95])


def test_nf4_loads_without_bitsandbytes(tmp_path) -> None:
    """Another Python in which `import bitsandbytes` fails restores the same weights from the file."""
    import subprocess
    import sys

    tensors = quantize_linear_weights({"fc.weight": torch.randn(64, 96)}, "", "nf4", nested=True)
    save(tensors, tmp_path / "one-bnb-nf4.safetensors")
    save({"ref": dequantized_reference(tensors, "fc.weight")}, tmp_path / "ref.safetensors")
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch; from safetensors.torch import load_file\n"
            "from modules.checkpoints.quantized import read_weights\n"
            f"w = read_weights({str(tmp_path / 'one-bnb-nf4.safetensors')!r})['fc.weight']\n"
            f"assert torch.equal(w.restore(torch.float32), load_file({str(tmp_path / 'ref.safetensors')!r})['ref'])\n"
            "assert 'bitsandbytes' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_codes_and_scales_move_with_their_layer(tmp_path) -> None:
    """Memory policies move layers block by block: the 4-bit codes and every scale must go along."""
    from modules.checkpoints.packed import pack_weights

    layer = torch.nn.Linear(32, 96)
    tensors = quantize_linear_weights({"fc.weight": layer.weight.detach()}, "", "nf4", nested=True)
    packed = quantized.read_weights(save(tensors, tmp_path / "one.safetensors"))["fc.weight"]
    pack_weights(layer, {"weight": packed}, torch.float32)
    assert torch.equal(layer.weight, dequantized_reference(tensors, "fc.weight"))
    layer.to("meta")
    restore = packed_weight(layer)
    moved = [restore.bnb_absmax, restore.bnb_quant_map, restore.bnb_nested_absmax, restore.bnb_offset]
    assert layer.parametrizations.weight.original.is_meta and all(t.is_meta for t in moved)


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """models/: the tiny SDXL checkpoint (fp16) and the same weights with the UNet's Linears as NF4 / FP4."""
    root = tmp_path_factory.mktemp("nf4-sdxl")
    folder = root / "models" / "Stable-diffusion"
    make_tiny_checkpoint("sdxl", folder / "full-sdxl.safetensors")
    sd = tiny_state_dict("sdxl")
    tensors = quantize_linear_weights(sd, UNET, "nf4", nested=True)
    save(tensors, folder / "tiny-sdxl-bnb-nf4.safetensors")
    save(quantize_linear_weights(sd, UNET, "fp4", nested=False), folder / "tiny-sdxl-bnb-fp4.safetensors")
    return make_engine(root), root, tensors


def test_sdxl_nf4_stays_4bit_and_is_close_to_the_float_model(sdxl) -> None:
    engine, _, tensors = sdxl
    ref, _ = image(engine, "full-sdxl")
    nf4, info = image(engine, "tiny-sdxl-bnb-nf4")
    model = engine.require_model()
    assert model.weight_dtype == "nf4" and parse(info)["Weight dtype"] == "nf4"
    to_q = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert packed_weight(to_q).format == "NF4"
    assert to_q.parametrizations.weight.original.dtype == torch.uint8  # codes in memory, not floats
    key = UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(to_q.weight, dequantized_reference(tensors, key, to_q.weight.dtype))
    assert packed_weight(model.unet.down_blocks[1].resnets[0].conv1) is None  # Forge keeps convolutions float
    # NF4 keeps 16 levels per 64-weight block, spaced for a Gaussian: ~9% RMS weight error (Q8_0's ~0.5% gives
    # 39.8 dB on this model; 18x the error is ~25 dB less). Every UNet Linear is 4-bit: 17.5 dB measured.
    # The bound, 15 dB, sits between that and a broken decode (swapped nibbles 10.9 dB, scales one block off
    # 13.1 dB, both measured); the exact weight check above is the sharp test, this one checks the image.
    assert not np.array_equal(nf4, ref) and psnr(nf4, ref) >= 15
    fp4, info = image(engine, "tiny-sdxl-bnb-fp4")
    assert engine.require_model().weight_dtype == "fp4" and parse(info)["Weight dtype"] == "fp4"
    # FP4's levels fit a Gaussian worse than NF4's, and these scales are not double-quantized: 15.7 dB measured
    assert 13 <= psnr(fp4, ref) < psnr(nf4, ref)


def test_lora_on_nf4_changes_the_image_and_reverts_exactly(sdxl) -> None:
    engine, root, _ = sdxl
    before, _ = image(engine, "tiny-sdxl-bnb-nf4")
    model = engine.require_model()
    mk.write(mk.lora_tensors(mk.module_layers(model.unet, "lora_unet_"), seed=3), root / "models" / "Lora" / "q.safetensors")
    to_q = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    codes = to_q.parametrizations.weight.original.clone()
    with_lora, info = image(engine, "tiny-sdxl-bnb-nf4", prompt="a red fox <lora:q:1>")
    after, _ = image(engine, "tiny-sdxl-bnb-nf4")
    assert "Lora hashes" in info and not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)
    assert torch.equal(to_q.parametrizations.weight.original, codes)  # the 4-bit codes were never written


def test_sd1_bnb_nf4_checkpoint(tmp_path) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    make_tiny_checkpoint("sd1", folder / "full-sd1.safetensors")
    tensors = quantize_linear_weights(tiny_state_dict("sd1"), UNET, "nf4", nested=False)
    save(tensors, folder / "sd15-bnb-nf4.safetensors")
    engine = make_engine(tmp_path)
    ref, _ = image(engine, "full-sd1")
    nf4, info = image(engine, "sd15-bnb-nf4")
    model = engine.require_model()
    assert model.spec.arch == "sd1" and model.weight_dtype == "nf4" and parse(info)["Weight dtype"] == "nf4"
    ff = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]
    key = UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"
    assert torch.equal(ff.weight, dequantized_reference(tensors, key, ff.weight.dtype))
    assert not np.array_equal(nf4, ref) and psnr(nf4, ref) >= 15  # as for SDXL


def test_flux_bnb_nf4_all_in_one(tmp_path) -> None:
    """Forge's flux1-dev-bnb-nf4 layout: an all-in-one file whose transformer Linears are NF4."""
    folder = tmp_path / "models" / "Stable-diffusion"
    make_all_in_one("flux-schnell", folder / "flux1-schnell-bf16.safetensors")
    tensors = quantize_linear_weights(all_in_one("flux-schnell"), UNET, "nf4", nested=True)
    save(tensors, folder / "flux1-schnell-bnb-nf4.safetensors")
    engine = make_engine(tmp_path)
    ref, _ = image(engine, "flux1-schnell-bf16", steps=1)
    nf4, info = image(engine, "flux1-schnell-bnb-nf4", steps=1)
    model = engine.require_model()
    assert model.weight_dtype == "nf4" and parse(info)["Weight dtype"] == "nf4"
    to_k = model.unet.transformer_blocks[0].attn.to_k  # the middle third of the fused qkv, split while packed
    whole = dequantized_reference(tensors, UNET + "double_blocks.0.img_attn.qkv.weight", to_k.weight.dtype)
    assert torch.equal(to_k.weight, whole[32:64])
    # every transformer Linear is NF4 (~9% RMS weight error each, as for SDXL); one step: 22.4 dB measured.
    # 19 dB leaves room; the exact to_k check above catches a wrong split (nested groups cut mid-way).
    assert not np.array_equal(nf4, ref) and psnr(nf4, ref) >= 19


# ---------------------------------------------------------------- bad files keep the old model

def test_bad_nf4_files_are_named_and_keep_the_old_model(sdxl) -> None:
    engine, root, tensors = sdxl
    engine.load_model("tiny-sdxl-bnb-nf4")
    old = engine.require_model()
    folder = root / "models" / "Stable-diffusion"
    good = (folder / "tiny-sdxl-bnb-nf4.safetensors").read_bytes()
    (folder / "cut-bnb-nf4.safetensors").write_bytes(good[: len(good) - 4096])
    with pytest.raises(CheckpointError, match=r"cut-bnb-nf4.safetensors is truncated"):
        engine.load_model("cut-bnb-nf4")
    keeps_old_model(engine, old)

    state_key = UNET + "input_blocks.4.1.proj_in.weight.quant_state.bitsandbytes__nf4"
    corrupt = {**tensors, state_key: torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 6'), dtype=torch.uint8)}
    save(corrupt, folder / "json-bnb-nf4.safetensors")
    with pytest.raises(CheckpointError, match=r"json-bnb-nf4.safetensors: the quant_state of "
                                              r"model.diffusion_model.input_blocks.4.1.proj_in.weight is not valid"):
        engine.load_model("json-bnb-nf4")
    keeps_old_model(engine, old)

    renamed = {k.replace("bitsandbytes__nf4", "bitsandbytes__int8") if k == state_key else k: v
               for k, v in tensors.items()}
    save(renamed, folder / "int8-bnb.safetensors")
    with pytest.raises(CheckpointError, match=r"int8-bnb.safetensors: tensor .*proj_in.weight uses bitsandbytes "
                                              r"quantization 'int8', which Atelier does not read"):
        engine.load_model("int8-bnb")
    keeps_old_model(engine, old)

    lost = {k: v for k, v in tensors.items() if not k.endswith("proj_in.weight.absmax")}
    save(lost, folder / "noscale-bnb-nf4.safetensors")
    with pytest.raises(CheckpointError, match=r"noscale-bnb-nf4.safetensors: the 4-bit weight .*proj_in.weight is "
                                              r"inconsistent \(.absmax has None elements"):
        engine.load_model("noscale-bnb-nf4")
    keeps_old_model(engine, old)


def test_api_lists_nf4_generates_with_it_and_refuses_a_corrupt_state(sdxl, tmp_path) -> None:
    import httpx

    from tests.api_server import start_server

    _, root, tensors = sdxl
    folder: Path = root / "models" / "Stable-diffusion"
    state_key = UNET + "input_blocks.4.1.proj_in.weight.quant_state.bitsandbytes__nf4"
    save({**tensors, state_key: torch.tensor(list(b"[1, 2"), dtype=torch.uint8)}, tmp_path / "bad-bnb-nf4.safetensors")
    srv = start_server(tmp_path, {"tiny-sdxl-bnb-nf4": folder / "tiny-sdxl-bnb-nf4.safetensors",
                                  "full-sdxl": folder / "full-sdxl.safetensors",
                                  "zz-bad-bnb-nf4": tmp_path / "bad-bnb-nf4.safetensors"})
    try:
        listed = {m["model_name"]: m for m in httpx.get(f"{srv.url}/sdapi/v1/sd-models", timeout=30).json()}
        assert listed["tiny-sdxl-bnb-nf4"]["weight_dtype"] == "nf4" and listed["full-sdxl"]["weight_dtype"] == "fp16"
        body = {k: v for k, v in PARAMS.items() if k != "save_images"}
        chosen = httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl-bnb-nf4"},
                            timeout=120)
        assert chosen.status_code == 200
        reply = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert reply.status_code == 200 and "Weight dtype: nf4" in reply.json()["info"]
        bad = httpx.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": "zz-bad-bnb-nf4"}, timeout=60)
        assert 400 <= bad.status_code < 500 and "zz-bad-bnb-nf4.safetensors" in bad.text and "quant_state" in bad.text
        reply = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=300)  # the NF4 model still generates
        assert reply.status_code == 200 and "Weight dtype: nf4" in reply.json()["info"]
    finally:
        srv.stop()
