"""Model upscalers: every layout against an independent forward (and spandrel where it imports),
tiling, safe loading, bad files, discovery, Extras sizes and the hires fix by name."""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules import infotext
from modules.errors import CheckpointError, InvalidParams, UnsafeCheckpointError
from modules.upscalers import extras
from modules.upscalers.discover import find_upscalers, scale_from_name
from modules.upscalers.load import load_upscaler
from modules.upscalers.runner import ModelUpscaler, TileSettings, to_tensor
from modules.upscalers.tiling import tile_starts, upscale_tiled
from tests.fixtures import make_tiny_upscalers as tiny

LAYOUTS = sorted(tiny.LAYOUTS)


def _image(w: int = 20, h: int = 14, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("suffix,wrap", [(".safetensors", None), (".pth", None), (".pth", "params_ema")])
def test_each_layout_matches_the_independent_forward(layout, suffix, wrap, tmp_path):
    sd = tiny.LAYOUTS[layout]()
    path = tiny.write(sd, tmp_path / f"{layout}{suffix}", wrap=wrap)
    loaded = load_upscaler(path)
    assert loaded.scale == tiny.SCALES[layout]
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, expected = loaded.net(x), tiny.reference_forward(layout, sd, x)
    assert ours.shape == (1, 3, 12 * loaded.scale, 16 * loaded.scale)
    assert expected.abs().max() > 1e-3  # the weights do something
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_matches_spandrel(layout, tmp_path):
    from tests.spandrel_reference import spandrel_or_skip

    spandrel = spandrel_or_skip()
    sd = tiny.LAYOUTS[layout]()
    loaded = load_upscaler(tiny.write(sd, tmp_path / f"{layout}.safetensors"))
    descriptor = spandrel.ModelLoader().load_from_state_dict({k: v.clone() for k, v in sd.items()})
    assert descriptor.scale == loaded.scale
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), descriptor.model.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["realesrgan-x2plus", "realesrgan-x1"])
def test_pixel_unshuffle_models_take_any_size(layout, tmp_path):
    loaded = load_upscaler(tiny.write(tiny.LAYOUTS[layout](), tmp_path / "m.safetensors"))
    x = torch.rand(1, 3, 13, 18)
    with torch.no_grad():
        out = loaded.net(x)
        f = {2: 2, 1: 4}[loaded.scale]
        padded = loaded.net(torch.nn.functional.pad(x, (0, -18 % f, 0, -13 % f), mode="reflect"))
    s = loaded.scale
    assert out.shape == (1, 3, 13 * s, 18 * s)
    torch.testing.assert_close(out, padded[:, :, : 13 * s, : 18 * s])


def test_tile_starts_cover_with_overlap():
    assert tile_starts(100, 200, 8) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("layout", ["srvgg-4x", "realesrgan-x4plus", "esrgan-old-2x"])
def test_tiled_equals_untiled(layout, tmp_path):
    loaded = load_upscaler(tiny.write(tiny.LAYOUTS[layout](), tmp_path / "m.safetensors"))
    x = to_tensor(_image(50, 38))
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        untiled = upscale_tiled(loaded.net, x, loaded.scale, 0, 0)
        tiled = upscale_tiled(loaded.net, x, loaded.scale, 24, 12, lambda done, total: calls.append((done, total)))
    assert tiled.shape == untiled.shape
    assert len(calls) == calls[-1][1] > 1 and calls[-1][0] == calls[-1][1]  # progress per tile
    # Tiles of 24 px are smaller than an RRDB trunk's receptive field, so blended seams differ a little.
    diff = (tiled - untiled).abs()
    assert diff.mean() < 0.05 * untiled.abs().mean() and diff.max() < 0.15 * untiled.abs().max()
    assert diff.max() > 0 or layout == "srvgg-4x"  # really tiled (compact nets may be exact)


def test_one_tile_is_exactly_untiled(tmp_path):
    loaded = load_upscaler(tiny.write(tiny.srvgg(), tmp_path / "m.safetensors"))
    x = to_tensor(_image())
    with torch.no_grad():
        assert torch.equal(upscale_tiled(loaded.net, x, 4, 64, 8), upscale_tiled(loaded.net, x, 4, 0, 0))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "models" / "ESRGAN" / "4x-evil.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model.0.weight": torch.zeros(1), "payload": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="Upscaler model .*4x-evil.pth was refused"):
        load_upscaler(path)
    with open(path, "wb") as f:  # a plain pickle (not a zip archive) too
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(CheckpointError, match="4x-evil.pth"):
        load_upscaler(path)
    assert not marker.exists()


def test_bad_files_give_clear_errors(tmp_path):
    good = tiny.write(tiny.esrgan_basicsr(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="Upscaler model .*truncated"):
        load_upscaler(truncated)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="Upscaler model .*junk.pth is corrupt"):
        load_upscaler(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_upscaler(tmp_path / "missing.pth")
    mismatched = tiny.esrgan_basicsr()
    mismatched["conv_hr.weight"] = torch.zeros(8, 5, 3, 3)
    with pytest.raises(CheckpointError, match="mismatched.safetensors: the weights do not fit"):
        load_upscaler(tiny.write(mismatched, tmp_path / "mismatched.safetensors"))
    unknown = tiny.write({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "unknown.safetensors")
    with pytest.raises(CheckpointError, match="unknown.safetensors"):
        load_upscaler(unknown)


def test_discovery_names_and_folders(tmp_path):
    models = tmp_path / "models"
    tiny.write(tiny.esrgan_old(2), models / "ESRGAN" / "4x-UltraSharp.pth")
    tiny.write(tiny.esrgan_basicsr(), models / "RealESRGAN" / "RealESRGAN_x4plus.pth", wrap="params_ema")
    tiny.write(tiny.srvgg(2), models / "upscale_models" / "2x_Compact.safetensors")
    tiny.write(tiny.srvgg(2), models / "upscale_models" / ".hidden" / "x.safetensors")
    (models / "DAT" / "readme.txt").parent.mkdir(parents=True)
    (models / "DAT" / "readme.txt").write_text("not a model")
    from modules.settings import Settings

    found = {f.name: f for f in find_upscalers(Settings(models_dir=models).upscaler_folders)}
    assert set(found) == {"4x-UltraSharp", "R-ESRGAN 4x+", "2x_Compact"}
    assert found["R-ESRGAN 4x+"].aliases == ("RealESRGAN_x4plus",) and found["2x_Compact"].scale == 2
    assert (scale_from_name("4x-UltraSharp"), scale_from_name("RealESRGAN_x2plus"), scale_from_name("foo")) == (4, 2, 4)


def test_runner_scale_is_exact_and_repeats_passes(tmp_path):
    path = tiny.write(tiny.srvgg(2), tmp_path / "2x.safetensors")
    runner = ModelUpscaler(TileSettings(tile=16, overlap=4))
    calls: list[tuple[int, int]] = []
    image = _image(20, 14)
    assert runner.upscale(image, 2, path).size == (40, 28)
    assert runner.upscale(image, 3.5, path, lambda d, t: calls.append((d, t))).size == (70, 49)
    assert max(t for _, t in calls) > 1  # two passes of a 2x model, tile by tile


def _lookup(path: Path):
    runner = ModelUpscaler(TileSettings())

    def get(name: str):
        if name == "Lanczos":
            return lambda image, scale: image.resize((round(image.width * scale), round(image.height * scale)))
        return lambda image, scale: runner.upscale(image, scale, path)

    return get


def test_extras_sizes_are_exact(tmp_path):
    lookup = _lookup(tiny.write(tiny.esrgan_basicsr(), tmp_path / "4x.safetensors"))
    image = _image(20, 14)
    out, info = extras.upscale(image, extras.ExtrasParams(upscaler_1="4x", upscaling_resize=2), lookup)
    assert out.size == (40, 28) and info == {"Postprocess upscale by": 2, "Postprocess upscaler": "4x"}
    crop = extras.ExtrasParams(resize_mode=1, upscaling_resize_w=50, upscaling_resize_h=20, upscaler_1="4x")
    assert extras.upscale(image, crop, lookup)[0].size == (50, 20)
    no_crop = dataclasses.replace(crop, upscaling_crop=False)
    assert extras.upscale(image, no_crop, lookup)[0].size == (50, 35)  # covers 50x20 keeping the aspect
    assert extras.upscale(image, extras.ExtrasParams(), lookup)[0].tobytes() == image.tobytes()


def test_extras_second_upscaler_is_blended(tmp_path):
    lookup = _lookup(tiny.write(tiny.srvgg(), tmp_path / "4x.safetensors"))
    image = _image(16, 16)
    params = extras.ExtrasParams(upscaler_1="4x", upscaler_2="Lanczos", upscaling_resize=2)
    first = np.asarray(extras.upscale(image, params, lookup)[0], dtype=float)
    second = np.asarray(lookup("Lanczos")(image, 2), dtype=float)
    half, info = extras.upscale(image, dataclasses.replace(params, extras_upscaler_2_visibility=0.5), lookup)
    assert np.abs(np.asarray(half, dtype=float) - (first + second) / 2).max() <= 1
    assert info["Postprocess upscaler 2"] == "Lanczos"


@pytest.mark.parametrize("field,value,message", [
    ("gfpgan_visibility", 1.5, "gfpgan_visibility must be between 0 and 1"),
    ("codeformer_weight", -0.5, "codeformer_weight must be between 0 and 1"),
    ("upscaling_resize", 9.0, "upscaling_resize must be between 1 and 8"),
    ("resize_mode", 2, "resize_mode must be 0"),
    ("extras_upscaler_2_visibility", 1.5, "extras_upscaler_2_visibility must be between"),
])
def test_extras_bad_params(field, value, message):
    with pytest.raises(InvalidParams, match=message) as err:
        extras.ExtrasParams(**{field: value}).validate(4096)
    assert err.value.field == field


@pytest.fixture(scope="module")
def upscaler_engine(tmp_path_factory, tiny_sd1):
    from tests.conftest import make_engine

    root = tmp_path_factory.mktemp("upscaler-engine")
    tiny.write(tiny.esrgan_old(2), root / "models" / "ESRGAN" / "4x-UltraSharp.pth")
    engine = make_engine(root)
    engine.load_model(tiny_sd1)
    return engine


def test_hires_fix_with_a_model_upscaler_by_name(upscaler_engine):
    from modules.pipeline.params import Txt2ImgParams
    from modules.ui.bindings import values_from_infotext

    base = dict(prompt="a red circle", steps=2, sampler_name="Euler", width=64, height=64, seed=3,
                rng_source="cpu", save_images=False, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1,
                denoising_strength=0.4)
    result = upscaler_engine.txt2img(Txt2ImgParams(**base, hr_upscaler="4x-UltraSharp"))
    assert result.images[0].size == (128, 128)  # a 4x model at hires scale 2 gives exactly 2x
    parsed = infotext.parse(result.infotexts[0])
    assert parsed["Hires upscaler"] == "4x-UltraSharp"
    values = values_from_infotext(parsed, dataclasses.asdict(Txt2ImgParams()))
    assert values["hr_upscaler"] == "4x-UltraSharp" and values["enable_hr"] is True
    lanczos = upscaler_engine.txt2img(Txt2ImgParams(**base, hr_upscaler="Lanczos"))
    assert lanczos.images[0].tobytes() != result.images[0].tobytes()  # the model really ran


def test_batch_folders_are_fenced(tmp_path):
    from modules.ui.extras_tab import batch_folder

    outputs = tmp_path / "outputs"
    (outputs / "in").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (outputs / "link").symlink_to(tmp_path / "secret")
    assert batch_folder(str(outputs / "in"), outputs, False, "input") == (outputs / "in").resolve()
    for bad in (str(outputs / ".." / "secret"), str(tmp_path / "secret"), str(outputs / "link"), "/etc"):
        with pytest.raises(InvalidParams, match="must be inside"):
            batch_folder(bad, outputs, False, "input")
    assert batch_folder(str(tmp_path / "secret"), outputs, True, "input") == (tmp_path / "secret").resolve()
    with pytest.raises(InvalidParams, match="Enter the input folder"):
        batch_folder("  ", outputs, True, "input")
