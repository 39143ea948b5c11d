"""An image input that says "this file is not an image (...)" instead of showing Gradio's internals.

A wrapper around one gr.Image's `preprocess`, not a subclass: Gradio writes a .pyi file next to the
source of every component class it meets.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import UnidentifiedImageError


def not_an_image(name: str, err: Exception) -> str:
    reason = str(err).split(" '/")[0].split(" '")[0] or type(err).__name__
    return f"this file is not an image ({name}: {reason}). Upload a PNG, JPEG or WebP picture."


def SafeImage(**kwargs: Any) -> gr.Image:  # noqa: N802 (used like the component it builds)
    """gr.Image whose upload errors reach the user as a plain message (in queued events' toasts).

    Images set by the server (Send to img2img, PNG Info) travel as PNG: Gradio's default is lossy WebP.
    """
    image = gr.Image(**{"format": "png", **kwargs})
    preprocess = image.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(not_an_image(name, err), print_exception=False) from None

    image.preprocess = checked
    return image
