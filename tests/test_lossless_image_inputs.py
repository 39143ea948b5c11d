"""Images the server puts into img2img, inpaint and PNG Info inputs (Send to ...) arrive unchanged.

Gradio's image components save server-set PIL values as lossy WebP by default; a photo sent to img2img
would be recompressed before the job reads it. This drives each component's own postprocess -> file ->
preprocess round trip, the path a "Send to" takes.
"""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from modules.ui.img2img import _mode_inputs


@pytest.fixture(scope="module")
def components() -> dict:
    handles: dict = {}
    with gr.Blocks():
        for mode in ("img2img", "inpaint", "sketch", "inpaint_upload"):
            _mode_inputs(mode, handles)
    return handles


def noisy_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA")


@pytest.mark.parametrize("name", ["image", "upload_image"])
def test_image_inputs_round_trip_pixel_exact(components, name):
    image = noisy_image()
    component = components[name]
    sent = component.postprocess(image)
    assert sent.path.endswith(".png")
    received = component.preprocess(sent)
    assert np.array_equal(np.asarray(received), np.asarray(image))


@pytest.mark.parametrize("name", ["editor", "sketch"])
def test_editor_backgrounds_round_trip_pixel_exact(components, name):
    image = noisy_image()
    sent = components[name].postprocess(image)
    assert sent.background.path.endswith(".png")
    with Image.open(sent.background.path) as stored:
        assert np.array_equal(np.asarray(stored.convert("RGBA")), np.asarray(image))
