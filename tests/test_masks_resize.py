"""Mask and resize helpers against A1111's definitions (and OpenCV's blur, via scipy)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules.pipeline import masks
from modules.pipeline.resize import extend_edges, flatten, resize_image


@pytest.mark.parametrize("sigma,size", [(1, 7), (4, 21), (4.5, 23), (64, 321)])
def test_blur_kernel_size(sigma, size):
    assert masks.blur_kernel_size(sigma) == size


def test_blur_matches_a_separable_gaussian_with_reflect101_borders():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    mask = (rng.random((40, 56)) > 0.7).astype(np.uint8) * 255
    ours = np.asarray(masks.blur(Image.fromarray(mask), 4), dtype=np.int16)
    kernel = masks._gaussian_1d(4)
    expected = np.rint(ndimage.correlate1d(mask.astype(np.float64), kernel, axis=1, mode="mirror"))
    expected = np.rint(ndimage.correlate1d(expected, kernel, axis=0, mode="mirror"))
    assert np.abs(ours - expected).max() == 0
    assert masks.blur(Image.fromarray(mask), 0).tobytes() == mask.tobytes()


def test_crop_region_and_ratio_expansion_as_a1111():
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (100, 200, 228, 232))  # a 128x32 stroke
    box = masks.crop_region(mask, 0)
    assert box == (100, 200, 228, 232)
    assert masks.expand_to_ratio(box, 512, 512, 512, 512) == (100, 152, 228, 280)  # 128x128
    assert masks.crop_region(mask, 300) == (0, 0, 512, 512)
    assert masks.expand_to_ratio((0, 480, 128, 512), 512, 512, 512, 512) == (0, 384, 128, 512)  # shifted inside
    assert masks.crop_region(Image.new("L", (8, 8), 0), 4) is None


def test_fill_takes_the_colours_around_the_hole():
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.paste((0, 0, 255), (20, 20, 44, 44))
    hole = Image.new("L", (64, 64), 0)
    hole.paste(255, (16, 16, 48, 48))
    filled = np.asarray(masks.fill(image, hole), dtype=np.int16)
    assert np.abs(filled[32, 32] - (200, 30, 30)).max() <= 2  # the blue square is gone
    assert np.array_equal(filled[:10], np.asarray(image)[:10])


def test_composite_is_exact_where_the_mask_is_zero():
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 128
    m[6:10, 6:10] = 255
    out = np.asarray(masks.composite(a, b, Image.fromarray(m)))
    assert np.array_equal(out[m == 0], np.asarray(a)[m == 0]) and np.array_equal(out[m == 255], np.asarray(b)[m == 255])


def _halves(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def test_resize_modes():
    wide = _halves(128, 64)
    assert resize_image(0, wide, 64, 64).size == (64, 64)
    cropped = np.asarray(resize_image(1, wide, 64, 64))  # the middle 64x64 of the wide image
    assert tuple(cropped[32, 2]) == (255, 0, 0) and tuple(cropped[32, 61]) == (0, 0, 255)
    filled = np.asarray(resize_image(2, wide, 64, 64))  # 64x32 in the middle, bands from the edge rows
    assert np.abs(filled[:16].astype(int) - filled[16:17].astype(int)).max() <= 8
    assert np.abs(filled[48:].astype(int) - filled[47:48].astype(int)).max() <= 8
    tall = np.asarray(resize_image(2, _halves(64, 128), 64, 64))  # 32x64 in the middle, bands left and right
    assert tuple(tall[32, 2]) == (255, 0, 0) and tuple(tall[32, 61]) == (0, 0, 255)


def test_extend_edges_keeps_the_original_and_flatten_uses_white():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    grown = extend_edges(image, 8, 0, 4, 12)
    assert grown.size == (40, 40)
    assert np.array_equal(np.asarray(grown)[4:28, 8:40], np.asarray(image))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert flatten(rgba).getpixel((0, 0)) == (255, 255, 255)
