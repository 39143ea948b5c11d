"""Reading init images and masks from files, bytes or base64 (data URLs too), with clear errors."""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from modules.errors import InvalidParams


def load_image(source: str | os.PathLike[str] | bytes, what: str = "image") -> Image.Image:
    """A fully decoded PIL image, EXIF orientation applied (as A1111 does for uploads).

    `source` is a path, raw file bytes, or base64 text (optionally a `data:image/...;base64,` URL).
    Raises InvalidParams naming `what` when it cannot be read.
    """
    data = _read(source, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return ImageOps.exif_transpose(image) or image.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidParams(f"cannot read the {what}: {err}") from err


def _read(source: str | os.PathLike[str] | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    text = str(source)
    if isinstance(source, str) and (text.startswith("data:") or len(text) > 1024):
        return _base64(text, what)
    path = Path(text)
    if not path.is_file():
        raise InvalidParams(f"the {what} {text!r} is not a file")
    return path.read_bytes()


def _base64(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidParams(f"the {what} is neither a file nor valid base64: {err}") from err
