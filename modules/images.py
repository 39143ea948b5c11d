"""Saving generated images with their infotext, and reading infotext back.

Files go to `<base_dir>/YYYY-MM-DD/NNNNN-SEED.ext`, numbered as A1111 numbers
them. Metadata is stored where A1111 and other tools look for it:

- PNG: a text chunk named `parameters` (tEXt, or iTXt when the text is not latin-1).
- JPEG and WebP: the EXIF UserComment (tag 0x9286, type UNDEFINED) of the Exif
  IFD, encoded as piexif's "unicode" UserComment: the 8 bytes `UNICODE\\0` and
  then UTF-16 big-endian, in a big-endian ("MM") TIFF structure, which is what
  A1111 writes through piexif. Readers that follow the TIFF byte order and
  readers that assume big-endian therefore agree.

A file is written under a hidden temporary name in the target folder, then
hard-linked to its final name (which fails rather than overwrites when another
writer took the name), falling back to `os.replace` where hard links are not
supported. A failed write leaves no file behind.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import secrets
import struct
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from modules.errors import InvalidParams

# Extension (as written in the file name) -> Pillow format.
FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

EXIF_IFD_TAG = 0x8769
USER_COMMENT_TAG = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_JIS_PREFIX = b"JIS\x00\x00\x00\x00\x00"
_UNDEFINED_PREFIX = b"\x00" * 8
_JPEG_MAX_EXIF = 65533  # one APP1 marker segment
_RE_NUMBERED = re.compile(r"([0-9]+)(?:-|$)")
_MAX_NAME_TRIES = 1000


def exif_with_user_comment(text: str) -> bytes:
    """EXIF block ("Exif\\0\\0" + big-endian TIFF) whose only entry is the UserComment `text`."""
    comment = _UNICODE_PREFIX + text.encode("utf-16-be")
    # IFD0 at offset 8 holds one entry (the Exif IFD pointer) and ends at 8 + 18 = 26;
    # the Exif IFD at 26 holds one entry and ends at 44, where the comment bytes start.
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD_TAG, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">HHHII", 1, USER_COMMENT_TAG, 7, len(comment), 44) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def _utf16_codec(body: bytes, byte_order: str) -> str:
    """Guess UTF-16 byte order: ASCII-heavy text has its zero bytes first in big-endian."""
    zeros_even, zeros_odd = body[0::2].count(0), body[1::2].count(0)
    if zeros_even != zeros_odd:
        return "utf-16-be" if zeros_even > zeros_odd else "utf-16-le"
    return "utf-16-le" if byte_order == "<" else "utf-16-be"


def decode_user_comment(data: bytes, byte_order: str = ">") -> str:
    """Decode an EXIF UserComment value; `byte_order` is the TIFF's, used when the text gives no hint."""
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            text = body.decode(_utf16_codec(body, byte_order), errors="replace")
    elif prefix == _ASCII_PREFIX:
        text = body.decode("utf-8", errors="replace")
    elif prefix == _JIS_PREFIX:
        text = body.decode("shift_jis", errors="replace")
    elif prefix == _UNDEFINED_PREFIX:
        text = body.decode("utf-8", errors="ignore")
    else:  # no prefix at all: A1111 reads the bytes as UTF-8
        text = data.decode("utf-8", errors="ignore")
    return text.rstrip("\x00")


def next_sequence_number(folder: Path) -> int:
    """The number after the highest leading number of any name in `folder` (0 when none), as A1111 does."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    highest = -1
    for name in names:
        match = _RE_NUMBERED.match(os.path.splitext(name)[0])
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def _pil_format(fmt: str) -> str:
    pil_format = FORMATS.get(fmt.lower())
    if pil_format is None:
        raise InvalidParams(f"Unknown image format {fmt!r}; use one of: {', '.join(FORMATS)}.")
    return pil_format


def _prepared(image: Image.Image, pil_format: str) -> Image.Image:
    """Convert to a mode the format can store (JPEG drops alpha; WebP keeps it)."""
    if pil_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        return image.convert("RGB")
    if pil_format == "WEBP" and image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def _encode(image: Image.Image, pil_format: str, infotext: str | None, quality: int, out: IO[bytes]) -> None:
    options: dict[str, Any] = {}
    if pil_format == "PNG":
        if infotext is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", infotext)
            options["pnginfo"] = info
    else:
        options["quality"] = quality
        if infotext is not None:
            exif = exif_with_user_comment(infotext)
            if pil_format == "JPEG" and len(exif) > _JPEG_MAX_EXIF:
                raise InvalidParams(
                    f"The infotext is too long to fit in JPEG metadata ({len(exif)} bytes, at most "
                    f"{_JPEG_MAX_EXIF}); save as PNG or WebP instead."
                )
            options["exif"] = exif
    _prepared(image, pil_format).save(out, format=pil_format, **options)


def image_to_png_bytes(image: Image.Image, infotext: str | None) -> bytes:
    """PNG file contents with `infotext` in the `parameters` chunk (none when None)."""
    buffer = io.BytesIO()
    _encode(image, "PNG", infotext, 95, buffer)
    return buffer.getvalue()


def _publish(tmp: str, folder: Path, seed: int, ext: str) -> Path:
    """Give the finished temporary file the next free `NNNNN-SEED.ext` name, never overwriting."""
    number = next_sequence_number(folder)
    for _ in range(_MAX_NAME_TRIES):
        target = folder / f"{number:05}-{seed}.{ext}"
        try:
            os.link(tmp, target)
        except FileExistsError:
            number += 1
            continue
        except OSError:  # the file system has no hard links
            if target.exists():
                number += 1
                continue
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        return target
    raise OSError(f"No free file name in {folder} after {_MAX_NAME_TRIES} tries.")


def save_image(
    image: Image.Image,
    base_dir: Path,
    seed: int,
    infotext: str | None,
    *,
    fmt: str = "png",
    date: datetime.date | None = None,
    quality: int = 95,
) -> Path:
    """Write `image` to `base_dir/YYYY-MM-DD/NNNNN-SEED.ext` with its infotext; return the path."""
    pil_format = _pil_format(fmt)
    if not 1 <= quality <= 100:
        raise InvalidParams(f"Image quality must be between 1 and 100, not {quality}.")
    folder = Path(base_dir) / (date or datetime.date.today()).isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the usual mode under the umask.
    tmp = str(folder / f".atelier-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            _encode(image, pil_format, infotext, quality, out)
            out.flush()
            os.fsync(out.fileno())
        return _publish(tmp, folder, seed, fmt.lower())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exif_comment(image: Image.Image) -> str | None:
    try:
        exif = image.getexif()
        value = exif.get_ifd(EXIF_IFD_TAG).get(USER_COMMENT_TAG)
    except Exception:  # Pillow raises many kinds of errors on malformed EXIF; treat as absent
        return None
    if isinstance(value, tuple):
        value = bytes(value)
    if isinstance(value, str):
        return value or None
    if not isinstance(value, bytes):
        return None
    return decode_user_comment(value, exif.endian or ">") or None


def _infotext_of(image: Image.Image) -> str | None:
    """A1111's order: the EXIF UserComment wins, then `parameters`, then a GIF comment."""
    comment = _exif_comment(image)
    if comment:
        return comment
    text = image.info.get("parameters")
    if text is None and isinstance(image, PngImagePlugin.PngImageFile):
        text = image.text.get("parameters")  # chunks after the image data are read on load
    if text is None and "comment" in image.info:
        raw = image.info["comment"]
        text = raw.decode("utf-8", errors="ignore") if isinstance(raw, bytes) else str(raw)
    return text if isinstance(text, str) else None


def read_infotext(source: Image.Image | str | os.PathLike[str] | bytes) -> str | None:
    """The infotext of an image object, a file path or the bytes of a file; None when it has none."""
    if isinstance(source, Image.Image):
        return _infotext_of(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            return _infotext_of(image)
    except UnidentifiedImageError as err:
        name = "the given bytes" if isinstance(source, bytes) else str(source)
        raise InvalidParams(f"Cannot read {name}: not an image file Pillow can open.") from err
