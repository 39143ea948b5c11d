"""An image input that says "this file is not an image (...)" instead of showing Gradio's internals."""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import UnidentifiedImageError


def not_an_image(name: str, err: Exception) -> str:
    reason = str(err).split(" '/")[0].split(" '")[0] or type(err).__name__
    return f"this file is not an image ({name}: {reason}). Upload a PNG, JPEG or WebP picture."

from gradio.events import Dependency

class SafeImage(gr.Image):
    """gr.Image (the same front end: `is_template`) whose upload errors are a plain user message."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(not_an_image(name, err), print_exception=False) from None
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component