"""lineart_standard, scribble_hed, scribble_pidinet and t2ia_sketch_pidi against references written
with scipy.ndimage (Gaussian filters with mirrored edges, maximum filters over line footprints) on
top of the soft-edge reference networks of test_controlnet_lines (random narrow weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from extensions.controlnet import preprocessors
from extensions.controlnet.annotators import Annotators, sketch
from tests.test_controlnet_lines import (
    RefPiDiNet,
    hed_model,
    hed_reference,
    make,
    padded,
    pidinet_reference,
    run,
    scene,
    seeded,
)

ndimage = pytest.importorskip("scipy.ndimage")
FOOTPRINTS = [np.array(f, bool) for f in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                          [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def ref_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's GaussianBlur by scipy: radius 4 sigma (float) or 3 sigma (uint8), reflect-101 edges."""
    is_uint8 = x.dtype == np.uint8
    sigmas = (sigma, sigma, 0)[: x.ndim]
    out = ndimage.gaussian_filter(x.astype(np.float64), sigmas, mode="mirror", truncate=3.0 if is_uint8 else 4.0)
    return out.round().clip(0, 255).astype(np.uint8) if is_uint8 else out


def ref_scribble(edges: np.ndarray) -> np.ndarray:
    x = ref_blur(edges.astype(np.float32), 3.0)
    ridge = np.zeros(x.shape, bool)
    for f in FOOTPRINTS:
        ridge |= ndimage.maximum_filter(x, footprint=f, mode="constant", cval=-np.inf) == x
    thin = np.where(ridge & (x > 127), 255, 0).astype(np.uint8)
    return np.where(ref_blur(thin, 3.0) > 4, 255, 0).astype(np.uint8)


def ref_lineart_standard(rgb: np.ndarray) -> np.ndarray:
    x = padded(rgb).astype(np.float32)
    intensity = np.min(ref_blur(x, 6.0) - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    return (intensity * 127).clip(0, 255).astype(np.uint8)[: rgb.shape[0], : rgb.shape[1]]


def mostly_equal(ours: np.ndarray, ref: np.ndarray, levels: int = 0, share: float = 0.01) -> None:
    assert ours.shape == (*ref.shape, 3) and ours.dtype == np.uint8 and (ours == ours[..., :1]).all()
    diff = np.abs(ours[..., 0].astype(int) - ref.astype(int))
    assert (diff > levels).mean() <= share
    assert ref.std() > 5, "the reference map is flat: the test would prove nothing"


@pytest.mark.parametrize("sigma", [3.0, 6.0])
def test_blur_matches_opencvs_kernel_by_scipy(sigma):
    x = np.random.default_rng(0).random((40, 52, 3)).astype(np.float32) * 255
    np.testing.assert_allclose(sketch.gaussian_blur(x, sigma), ref_blur(x, sigma), rtol=1e-4, atol=1e-3)
    u = x[..., 0].astype(np.uint8)
    assert np.abs(sketch.gaussian_blur(u, sigma).astype(int) - ref_blur(u, sigma)).max() <= 1


@pytest.mark.parametrize("size", [(64, 64), (70, 100)])  # the second is padded to 128x128 and cropped back
def test_lineart_standard_matches_the_reference(size):
    rgb = scene(*size)
    rgb[5:60, 40:42] = 0  # a dark stroke: the normalising median is taken over its values
    ours = run("lineart_standard", None, rgb)
    mostly_equal(ours, ref_lineart_standard(rgb), levels=1)
    assert preprocessors.find("lineart_standard (from white bg & black line)").name == "lineart_standard"
    assert run("lineart_standard", None, np.full((32, 32, 3), 200, np.uint8)).max() == 0  # a flat image has no lines


def test_scribble_thins_and_thresholds_a_soft_edge_map():
    yy, xx = np.mgrid[0:64, 0:64]
    ridge = (255 * np.exp(-((xx - 30) ** 2) / 40.0)).astype(np.uint8)  # a soft vertical edge at x = 30
    ridge[yy < 10] = 0
    ours = sketch.scribble(ridge)
    np.testing.assert_array_equal(ours[..., 0], ref_scribble(ridge))
    row = ours[32, :, 0]
    assert row[30] == 255 and row[0] == row[63] == 0 and set(np.unique(ours)) == {0, 255}
    assert (ours[:4] == 0).all()  # the blank top stays blank


def test_scribble_hed_and_pidinet_and_sketch_match_the_references(tmp_path):
    hed, pidi, rgb = hed_model(), seeded(RefPiDiNet, 1, gain=1.2), scene(64, 96)
    make(hed, tmp_path / "ControlNetHED.pth")
    make(pidi, tmp_path / "table5_pidinet.pth", wrap=True)
    folder = Annotators(tmp_path)
    hed_map = hed_reference(hed, rgb, safe=False)
    pidi_map = pidinet_reference(pidi, rgb, safe=False)
    mostly_equal(run("scribble_hed", folder, rgb), ref_scribble(hed_map))
    mostly_equal(run("scribble_pidinet", folder, rgb), ref_scribble(pidi_map))
    with torch.no_grad():
        bgr = padded(rgb)[..., ::-1].copy()
        edge = pidi(torch.from_numpy(bgr).float().permute(2, 0, 1)[None] / 255.0)[0, 0].numpy()[:64, :96]
    mostly_equal(run("t2ia_sketch_pidi", folder, rgb), np.where(edge > 0.5, 255, 0).astype(np.uint8))
    assert preprocessors.find("fake_scribble").name == "scribble_hed"
    assert preprocessors.find("pidinet_sketch").name == "t2ia_sketch_pidi"
