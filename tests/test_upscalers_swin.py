"""SwinIR and HAT upscalers against spandrel's networks on the same tiny random weights.

The state dicts come from spandrel's own architecture classes built with tiny sizes (so the keys,
shapes and buffers are those of the released checkpoints), with every weight randomised; the
files are written by test code and read back through Atelier's loader. Outputs must match
spandrel's to float32 tolerance, and scale and variant must match what spandrel detects.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modules.errors import CheckpointError
from modules.upscalers import hat, swinir
from modules.upscalers.load import load_upscaler
from modules.upscalers.runner import ModelUpscaler, TileSettings, to_tensor
from modules.upscalers.tiling import upscale_tiled
from tests.fixtures import make_tiny_upscalers as tiny
from tests.spandrel_reference import spandrel_or_skip

SWINIR = {  # name: (spandrel SwinIR arguments, Atelier's label, scale)
    "classical-x2": (dict(upsampler="pixelshuffle", upscale=2), "SwinIR", 2),
    "classical-x3-3conv": (dict(upsampler="pixelshuffle", upscale=3, resi_connection="3conv"), "SwinIR", 3),
    "lightweight-x4": (dict(upsampler="pixelshuffledirect", upscale=4), "SwinIR (lightweight)", 4),
    "realsr-x4-3conv": (dict(upsampler="nearest+conv", upscale=4, resi_connection="3conv"),
                        "SwinIR (real-world SR)", 4),
    "realsr-x2": (dict(upsampler="nearest+conv", upscale=2), "SwinIR (real-world SR)", 2),
    "jpeg-window7": (dict(upsampler="", upscale=1, window_size=7, img_size=14, img_range=255.0, in_chans=1),
                     "SwinIR (restoration)", 1),
    # Trained on images no larger than a window: no shifted blocks, seen from the saved buffers.
    # spandrel's loader assumes 64-px training images and refuses the file, so only its class is the reference.
    "no-shift": (dict(upsampler="pixelshuffle", upscale=2, img_size=4), "SwinIR", 2),
}
LOADER_DIFFERS = {"no-shift"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAT = {  # name: (spandrel HAT arguments, variant, scale)
    "hat-x2": (dict(embed_dim=24, depths=(2, 2), num_heads=(2, 2), compress_ratio=3, squeeze_factor=12,
                    upscale=2), "HAT", 2),
    "hat-s-x4": (dict(embed_dim=24, depths=(2,), num_heads=(3,), compress_ratio=24, squeeze_factor=24,
                      upscale=4), "HAT-S", 4),
    "hat-l-x3": (dict(embed_dim=12, depths=(1,) * 9, num_heads=(2,) * 9, compress_ratio=3, squeeze_factor=6,
                      upscale=3, resi_connection="identity"), "HAT-L", 3),
}


def _randomise(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The network's state dict with every learned weight random and large enough to matter,
    also loaded into `net`."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in net.state_dict().items():
        if not value.is_floating_point() or key.endswith("attn_mask"):
            sd[key] = value.clone()
        elif "relative_position_bias_table" in key:
            sd[key] = torch.randn(value.shape, generator=gen) * 0.5
        elif value.ndim >= 2:
            sd[key] = torch.randn(value.shape, generator=gen) / math.sqrt(value[0].numel())
        else:
            base = 1.0 if "norm" in key and key.endswith("weight") else 0.0
            sd[key] = base + torch.randn(value.shape, generator=gen) * 0.1
    net.load_state_dict(sd)
    return sd


def swinir_reference(name: str) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(state dict, spandrel's SwinIR holding it) for a variant of `SWINIR`."""
    spandrel_or_skip()
    from spandrel.architectures.SwinIR import SwinIR

    args = dict(img_size=16, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, mlp_ratio=2.0)
    net = SwinIR(**{**args, **SWINIR[name][0]})
    return _randomise(net, seed=len(name)), net.eval()


def hat_reference(name: str) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    spandrel_or_skip()
    from spandrel.architectures.HAT import HAT as Reference

    args = dict(img_size=16, window_size=4, overlap_ratio=0.5, mlp_ratio=2.0, num_feat=16)
    net = Reference(**{**args, **HAT[name][0]})
    return _randomise(net, seed=len(name)), net.eval()


def swinir_weights(name: str) -> dict[str, torch.Tensor]:
    return swinir_reference(name)[0]


def hat_weights(name: str) -> dict[str, torch.Tensor]:
    return hat_reference(name)[0]


def _compare(sd: dict[str, torch.Tensor], net: torch.nn.Module, path, label: str, scale: int, channels: int = 3,
             loader_agrees: bool = True) -> None:
    """Atelier's network from the file against spandrel's class and (where it agrees) spandrel's loader."""
    spandrel = spandrel_or_skip()
    loaded = load_upscaler(tiny.write(sd, path))
    assert (loaded.architecture, loaded.scale) == (label, scale)
    x = torch.rand(1, channels, 18, 22, generator=torch.Generator().manual_seed(3))  # not whole windows
    with torch.no_grad():
        ours, expected = loaded.net(x), net(x)
    assert ours.shape == (1, channels, 18 * scale, 22 * scale)
    assert (expected - x.mean()).abs().max() > 1e-2  # the weights do something
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    if loader_agrees:
        detected = spandrel.ModelLoader().load_from_state_dict({k: v.clone() for k, v in sd.items()})
        assert detected.scale == scale
        with torch.no_grad():
            torch.testing.assert_close(ours, detected.model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SWINIR))
def test_swinir_matches_spandrel(name, tmp_path):
    _, label, scale = SWINIR[name]
    channels = SWINIR[name][0].get("in_chans", 3)
    _compare(*swinir_reference(name), tmp_path / f"{name}.safetensors", label, scale, channels,
             loader_agrees=name not in LOADER_DIFFERS)


@pytest.mark.parametrize("name", sorted(HAT))
def test_hat_matches_spandrel(name, tmp_path):
    _, label, scale = HAT[name]
    _compare(*hat_reference(name), tmp_path / f"{name}.safetensors", label, scale)


def test_pth_with_params_ema_wrapper(tmp_path):
    sd = swinir_weights("classical-x2")
    loaded = load_upscaler(tiny.write(sd, tmp_path / "002_SwinIR_SR_x2.pth", wrap="params_ema"))
    assert (loaded.architecture, loaded.scale) == ("SwinIR", 2)


def test_detection_is_exclusive():
    swinir_keys, hat_keys = set(swinir_weights("classical-x2")), set(hat_weights("hat-x2"))
    assert swinir.is_swinir(swinir_keys) and not hat.is_hat(swinir_keys)
    assert hat.is_hat(hat_keys) and not swinir.is_swinir(hat_keys)
    swin2sr = swinir_keys | {"layers.0.residual_group.blocks.0.attn.logit_scale"}
    assert not swinir.is_swinir(swin2sr)  # Swin2SR is left to spandrel
    assert not swinir.is_swinir(swinir_keys | {"absolute_pos_embed"})  # so is SwinIR with position embeddings


def test_each_family_is_claimed_by_exactly_one_detector():
    from modules.upscalers.load import ARCHITECTURES
    from tests.fixtures import tiny_reference_upscalers as others

    cases = {"swinir": swinir_weights("lightweight-x4"), "hat": hat_weights("hat-s-x4"), "dat": others.dat("DAT-light"),
             "span": others.span(), "omnisr": others.omnisr(), "esrgan": tiny.esrgan_basicsr(), "srvgg": tiny.srvgg()}
    for family, sd in cases.items():
        claimed = [detect.__module__.rsplit(".", 1)[1] for detect, _ in ARCHITECTURES if detect(set(sd))]
        assert claimed == [family], (family, claimed)


def test_swinir_tiled_matches_untiled(tmp_path):
    loaded = load_upscaler(tiny.write(swinir_weights("classical-x2"), tmp_path / "m.safetensors"))
    rng = np.random.default_rng(0)
    x = to_tensor(Image.fromarray(rng.integers(0, 256, (44, 52, 3), dtype=np.uint8), "RGB"))
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        untiled = upscale_tiled(loaded.net, x, 2, 0, 0)
        whole = upscale_tiled(loaded.net, x, 2, 64, 8)
        tiled = upscale_tiled(loaded.net, x, 2, 32, 16, lambda done, total: calls.append((done, total)))
    assert torch.equal(whole, untiled)
    assert calls[-1] == (len(calls), len(calls)) and len(calls) > 1
    # Attention sees only its tile and the receptive field of stacked shifted windows is wide (about
    # 20 px here), so tiles of 32 blend to a result a little off the whole-image one near the seams.
    diff = (tiled - untiled).abs()
    assert 0 < diff.max() < 0.15 * untiled.abs().max() and diff.mean() < 0.05 * untiled.abs().mean()


def test_hat_through_the_runner_is_exact_on_size(tmp_path):
    path = tiny.write(hat_weights("hat-x2"), tmp_path / "HAT_SRx2.safetensors")
    image = Image.new("RGB", (21, 17), (120, 40, 200))
    tiles: list[tuple[int, int]] = []
    out = ModelUpscaler(TileSettings(tile=16, overlap=4, device="cpu")).upscale(
        image, 1.5, path, lambda done, total: tiles.append((done, total)))
    assert out.size == (32, 26) and tiles[-1] == (4, 4)


def test_one_channel_model_runs_on_rgb_images_through_the_runner(tmp_path):
    """A greyscale model (the JPEG-artefact SwinIR) reads the image's luma and returns grey RGB."""
    sd, reference = swinir_reference("jpeg-window7")
    path = tiny.write(sd, tmp_path / "004_grayCAR_DFWB_s126w7_SwinIR-M_jpeg10.safetensors")
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB")
    out = ModelUpscaler(TileSettings(device="cpu")).upscale(image, 1, path)
    grey = to_tensor(image.convert("L").convert("RGB"))[:, :1]
    with torch.no_grad():
        expected = reference(grey).clamp(0, 1).mul(255).round()[0, 0].numpy()
    result = np.asarray(out, dtype=np.float32)
    assert out.size == image.size and (result[..., 0] == result[..., 2]).all()
    assert np.abs(result[..., 1] - expected).max() <= 2  # PIL's integer luma against ours in float


def test_mismatched_and_corrupt_files_give_clear_errors(tmp_path):
    sd = swinir_weights("classical-x2")
    sd["layers.1.residual_group.blocks.0.mlp.fc2.weight"] = torch.zeros(16, 7)
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors: the weights do not fit"):
        load_upscaler(tiny.write(sd, tmp_path / "wrong.safetensors"))
    sd = swinir_weights("classical-x2")
    del sd["layers.0.residual_group.blocks.1.norm2.bias"]
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: the weights do not fit"):
        load_upscaler(tiny.write(sd, tmp_path / "missing.safetensors"))
    sd = hat_weights("hat-x2")
    sd["upsample.0.weight"] = sd["upsample.0.weight"][:40]
    with pytest.raises(CheckpointError, match=r"bad-upsample\.safetensors: upsample\.0 has 40 outputs"):
        load_upscaler(tiny.write(sd, tmp_path / "bad-upsample.safetensors"))
    sd = hat_weights("hat-x2")
    sd["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"] = torch.zeros(50, 2)
    with pytest.raises(CheckpointError, match=r"table\.safetensors: .*not a square window"):
        load_upscaler(tiny.write(sd, tmp_path / "table.safetensors"))
    good = tiny.write(hat_weights("hat-x2"), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"Upscaler model .*truncated"):
        load_upscaler(truncated)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.api_server import start_server

    root = tmp_path_factory.mktemp("swin-api")
    models = root / "models"
    tiny.write(swinir_weights("realsr-x2"), models / "SwinIR" / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x2_GAN.pth",
               wrap="params_ema")
    tiny.write(hat_weights("hat-s-x4"), models / "HAT" / "HAT-S_SRx4.safetensors")
    broken = swinir_weights("classical-x2")
    broken["conv_after_body.weight"] = broken["conv_after_body.weight"][:, :5]
    tiny.write(broken, models / "SwinIR" / "broken-x2.safetensors")
    srv = start_server(root)
    yield srv
    srv.stop()


def _post(server, image: Image.Image, upscaler: str, resize: float):
    import base64
    import io

    import httpx

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return httpx.post(f"{server.url}/sdapi/v1/extra-single-image", timeout=120, json={
        "image": base64.b64encode(buffer.getvalue()).decode(), "upscaler_1": upscaler, "upscaling_resize": resize})


def test_extras_api_with_swinir_and_hat(server):
    import base64
    import io

    import httpx

    upscalers = {u["name"]: u for u in httpx.get(f"{server.url}/sdapi/v1/upscalers").json()}
    assert upscalers["HAT-S_SRx4"]["scale"] == 4 and upscalers["HAT-S_SRx4"]["model_name"] == "HAT"
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (14, 18, 3), dtype=np.uint8), "RGB")
    for name, resize, size in [("003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x2_GAN", 2, (36, 28)),
                               ("HAT-S_SRx4", 3, (54, 42))]:
        r = _post(server, image, name, resize)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == size


def test_extras_api_broken_swinir_is_a_clear_4xx_and_others_keep_working(server):
    image = Image.new("RGB", (12, 10), (10, 200, 30))
    r = _post(server, image, "broken-x2", 2)
    assert r.status_code == 422 and "broken-x2.safetensors: the weights do not fit" in r.text, r.text
    assert "replace or remove the file" in r.text
    assert "Traceback" not in r.text
    assert _post(server, image, "HAT-S_SRx4", 2).status_code == 200
