"""SPAN, OmniSR and DAT (all four variants) run on Atelier's own networks: outputs equal spandrel's.

The tiny checkpoints (tests/fixtures/tiny_reference_upscalers.py) take their key layouts from
spandrel's reference classes and are written to .safetensors/.pth files, then read back through
`load_upscaler`, the path users take.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules.errors import CheckpointError
from modules.upscalers import span
from modules.upscalers.load import load_upscaler
from modules.upscalers.runner import ModelUpscaler, TileSettings
from tests.fixtures import make_tiny_upscalers
from tests.fixtures import tiny_reference_upscalers as tiny
from tests.spandrel_reference import spandrel_or_skip


@pytest.fixture(scope="module")
def spandrel():
    return spandrel_or_skip()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(sd: dict[str, torch.Tensor], path, wrap: str | None = None):
    return make_tiny_upscalers.write({k: v.clone() for k, v in sd.items()}, path, wrap=wrap)


def _reference(spandrel, sd: dict[str, torch.Tensor]):
    return spandrel.ModelLoader().load_from_state_dict({k: v.clone() for k, v in sd.items()})


def _image(h: int, w: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    assert theirs.abs().max() > 1e-2  # the weights do something
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))


@pytest.mark.parametrize("scale,norm", [(4, True), (2, False), (1, True)])
def test_span_matches_spandrel(spandrel, scale, norm, tmp_path):
    sd = tiny.span(scale=scale, norm=norm)
    loaded = load_upscaler(_write(sd, tmp_path / f"{scale}x-SPAN.pth", wrap="params_ema"))
    reference = _reference(spandrel, sd)
    assert (loaded.architecture, loaded.scale) == ("SPAN", scale) and reference.scale == scale
    x = _image(16, 20)
    with torch.no_grad():
        ours, theirs = loaded.net(x), reference.model.eval()(x)
        assert ours.shape == (1, 3, 16 * scale, 20 * scale)
        # The input is scaled by 255, so fp32 rounding of the folded convs shows at ~1e-4 relative:
        _assert_same(ours, theirs, rtol=1e-3)
        net = loaded.net.double()
        span.fold_all(net)  # in float64 the fold and the reference's branches agree to rounding
        _assert_same(net(x.double()), reference.model.double()(x.double()), rtol=1e-9)


@pytest.mark.parametrize("options", [
    dict(scale=4), dict(scale=2, pe=False, bias=False), dict(scale=1, blocks=2, groups=2, window=4)],
    ids=["x4", "x2-no-pe-no-bias", "x1-2x2-window4"])
def test_omnisr_matches_spandrel(spandrel, options, tmp_path):
    sd = tiny.omnisr(**options)
    loaded = load_upscaler(_write(sd, tmp_path / "OmniSR.safetensors"))
    reference = _reference(spandrel, sd)
    scale = options["scale"]
    assert (loaded.architecture, loaded.scale) == ("OmniSR", scale) and reference.scale == scale
    for h, w in ((16, 16), (20, 28)):  # the second is padded to the window and cropped back
        x = _image(h, w)
        with torch.no_grad():
            _assert_same(loaded.net(x), reference.model.eval()(x))


def test_omnisr_takes_small_images_and_thop_counters(tmp_path):
    sd = tiny.omnisr(scale=2)
    sd |= {"total_ops": torch.zeros(1, dtype=torch.float64), "input.total_params": torch.zeros(1)}
    loaded = load_upscaler(_write(sd, tmp_path / "OmniSR-thop.pth"))
    with torch.no_grad():
        out = loaded.net(_image(6, 10))
    assert out.shape == (1, 3, 12, 20) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant,scale", [("DAT-S", 2), ("DAT", 4), ("DAT-2", 3), ("DAT-light", 2)])
def test_dat_variants_match_spandrel(spandrel, variant, scale, tmp_path):
    sd = tiny.dat(variant, scale=scale)
    loaded = load_upscaler(_write(sd, tmp_path / f"{scale}x-{variant}.pth", wrap="params"))
    reference = _reference(spandrel, sd)
    assert (loaded.architecture, loaded.scale) == (variant, scale) and reference.scale == scale
    for h, w in ((16, 16), (20, 28)):  # windows of 8x16 / 8x32: padded inside the attention, cropped back
        x = _image(h, w)
        with torch.no_grad():
            _assert_same(loaded.net(x), reference.model.eval()(x))


def test_dat_without_its_window_table_is_refused(tmp_path):
    sd = {k: v for k, v in tiny.dat("DAT-light").items() if not k.endswith("rpe_biases")}
    with pytest.raises(CheckpointError, match="no-rpe.safetensors: DAT: the window size table .* is missing"):
        load_upscaler(_write(sd, tmp_path / "no-rpe.safetensors"))


@pytest.mark.parametrize("family,make,key", [
    ("SPAN", tiny.span, "block_3.c2_r.conv.1.weight"),
    ("OmniSR", tiny.omnisr, "residual_layer.0.esa.conv3.weight"),
    ("DAT", lambda: tiny.dat("DAT-S"), "layers.1.blocks.0.attn.spatial_interaction.0.weight"),
])
def test_mismatched_weights_name_the_file(family, make, key, tmp_path):
    sd = make()
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    path = _write(sd, tmp_path / f"broken-{family}.safetensors")
    with pytest.raises(CheckpointError, match=f"broken-{family}.safetensors: the weights do not fit"):
        load_upscaler(path)


@pytest.mark.parametrize("name,make", [
    ("2x-SPAN", lambda: tiny.span(scale=2)), ("2x-OmniSR", lambda: tiny.omnisr(scale=2)),
    ("2x-DAT-light", lambda: tiny.dat("DAT-light", scale=2))])
def test_runner_tiles_each_family_to_the_exact_size(name, make, tmp_path):
    path = _write(make(), tmp_path / f"{name}.safetensors")
    runner = ModelUpscaler(TileSettings(tile=16, overlap=4))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 20, 3), dtype=np.uint8), "RGB")
    tiles: list[tuple[int, int]] = []
    out = runner.upscale(image, 3, path, lambda done, total: tiles.append((done, total)))
    assert out.size == (60, 42) and tiles and tiles[-1][0] == tiles[-1][1] > 1
