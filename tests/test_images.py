"""Saving images with infotext: numbering, atomic writes, and metadata A1111 can read."""
from __future__ import annotations

import datetime
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from modules import images
from modules.errors import InvalidParams

DAY = datetime.date(2024, 7, 21)
INFOTEXT = (
    "a cat, sitting: on a mat 🐱 — «ünïcödé» 漢字\n"
    "second line\n"
    "Negative prompt: blurry, \"bad\"\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 64x48"
)


def _image(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (64, 48), (200, 30, 90, 128)[: len(mode)] if mode != "L" else 100)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _tiff_user_comment(exif: bytes) -> tuple[str, int, bytes]:
    """Independent reader: (byte order mark, field type, value) of the Exif IFD's UserComment."""
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    order = ">" if tiff[:2] == b"MM" else "<"

    def entries(offset: int):
        (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
        for i in range(count):
            yield struct.unpack(order + "HHII", tiff[offset + 2 + 12 * i : offset + 14 + 12 * i])

    (ifd0,) = struct.unpack(order + "I", tiff[4:8])
    exif_ifd = next(value for tag, _, _, value in entries(ifd0) if tag == 0x8769)
    tag, typ, count, offset = next(e for e in entries(exif_ifd) if e[0] == 0x9286)
    return tiff[:2].decode(), typ, tiff[offset : offset + count]


# --- numbering and file names --------------------------------------------------------------------


def test_first_file_is_numbered_zero_in_a_dated_folder(tmp_path):
    path = images.save_image(_image(), tmp_path, 1234, None, date=DAY)
    assert path == tmp_path / "2024-07-21" / "00000-1234.png"
    assert path.is_file()


def test_numbering_continues_after_the_highest_existing_number(tmp_path):
    folder = tmp_path / "2024-07-21"
    folder.mkdir()
    for name in ["00007-x.png", "00003-99.jpg", "notes.txt", "grid-0042.png", "abc00050-1.png", "00099abc.png"]:
        (folder / name).write_bytes(b"")
    path = images.save_image(_image(), tmp_path, 55, None, date=DAY)
    assert path.name == "00008-55.png"
    path = images.save_image(_image(), tmp_path, 55, None, date=DAY)
    assert path.name == "00009-55.png"


def test_numbering_counts_bare_numbers_and_long_numbers_like_a1111(tmp_path):
    for name in ["00012.png", "123456-7.webp"]:
        (tmp_path / name).write_bytes(b"")
    assert images.next_sequence_number(tmp_path) == 123457
    assert images.next_sequence_number(tmp_path / "missing") == 0


def test_existing_name_is_never_overwritten(tmp_path, monkeypatch):
    folder = tmp_path / DAY.isoformat()
    folder.mkdir()
    taken = folder / "00003-5.png"
    taken.write_bytes(b"someone else's file")
    # Another writer took the name between the scan and the rename.
    monkeypatch.setattr(images, "next_sequence_number", lambda _folder: 3)
    path = images.save_image(_image(), tmp_path, 5, "x", date=DAY)
    assert path.name == "00004-5.png"
    assert taken.read_bytes() == b"someone else's file"


def test_unknown_format_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(InvalidParams, match="gif"):
        images.save_image(_image(), tmp_path, 1, "x", fmt="gif", date=DAY)
    assert list(tmp_path.iterdir()) == []


def test_bad_quality_is_rejected(tmp_path):
    with pytest.raises(InvalidParams):
        images.save_image(_image(), tmp_path, 1, "x", fmt="jpg", quality=0, date=DAY)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        images.save_image(_image(), tmp_path, 1, INFOTEXT, date=DAY)
    assert list((tmp_path / DAY.isoformat()).iterdir()) == []


def test_failed_publish_leaves_no_temporary_file(tmp_path, monkeypatch):
    def no_names(tmp, folder, seed, ext):
        raise OSError("no free name")

    monkeypatch.setattr(images, "_publish", no_names)
    with pytest.raises(OSError):
        images.save_image(_image(), tmp_path, 1, INFOTEXT, fmt="webp", date=DAY)
    assert list((tmp_path / DAY.isoformat()).iterdir()) == []


def test_default_date_is_today(tmp_path):
    path = images.save_image(_image(), tmp_path, 3, None)
    assert path.parent.name == datetime.date.today().isoformat()


# --- PNG --------------------------------------------------------------------------------------------


def test_png_round_trip_through_a_real_file(tmp_path):
    path = images.save_image(_image(), tmp_path, 1234567890, INFOTEXT, date=DAY)
    assert images.read_infotext(path) == INFOTEXT
    assert images.read_infotext(str(path)) == INFOTEXT
    with Image.open(path) as image:
        assert image.info["parameters"] == INFOTEXT  # where A1111's read_info_from_image looks
        assert image.size == (64, 48)


def test_png_uses_a_parameters_text_chunk(tmp_path):
    latin = "a cat\nSteps: 20, Sampler: Euler, Seed: 1"
    chunks = dict(_png_chunks(images.image_to_png_bytes(_image(), latin)))
    assert chunks[b"tEXt"] == b"parameters\x00" + latin.encode("latin-1")
    # Text outside latin-1 goes into an iTXt chunk (uncompressed, no language tag), as Pillow's add_text does.
    chunks = dict(_png_chunks(images.image_to_png_bytes(_image(), INFOTEXT)))
    keyword, _, rest = chunks[b"iTXt"].partition(b"\x00")
    assert keyword == b"parameters"
    assert rest.endswith(INFOTEXT.encode("utf-8"))
    assert b"tEXt" not in chunks


def test_png_bytes_helper(tmp_path):
    data = images.image_to_png_bytes(_image("RGBA"), INFOTEXT)
    assert images.read_infotext(data) == INFOTEXT
    assert images.read_infotext(Image.open(io.BytesIO(data))) == INFOTEXT
    plain = images.image_to_png_bytes(_image(), None)
    assert images.read_infotext(plain) is None
    assert not any(kind in (b"tEXt", b"iTXt", b"zTXt") for kind, _ in _png_chunks(plain))


def test_png_text_after_image_data_is_found():
    data = images.image_to_png_bytes(_image(), None)
    body = b"parameters\x00late text, Steps: 1"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    iend = data.rindex(b"IEND") - 4
    assert images.read_infotext(data[:iend] + chunk + data[iend:]) == "late text, Steps: 1"


def test_png_without_infotext(tmp_path):
    path = images.save_image(_image(), tmp_path, 1, None, date=DAY)
    assert images.read_infotext(path) is None


# --- JPEG and WebP ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_exif_round_trip_through_a_real_file(tmp_path, fmt, pil_format):
    path = images.save_image(_image(), tmp_path, 42, INFOTEXT, fmt=fmt, date=DAY)
    assert path.name == f"00000-42.{fmt}"
    with Image.open(path) as image:
        assert image.format == pil_format
        assert "exif" in image.info
    assert images.read_infotext(path) == INFOTEXT
    assert images.read_infotext(path.read_bytes()) == INFOTEXT


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_exif_layout_matches_piexif_unicode_user_comment(tmp_path, fmt):
    path = images.save_image(_image(), tmp_path, 42, INFOTEXT, fmt=fmt, date=DAY)
    with Image.open(path) as image:
        order, typ, value = _tiff_user_comment(image.info["exif"])
    assert order == "MM"  # piexif writes big-endian TIFF
    assert typ == 7  # UNDEFINED, as the EXIF spec (and piexif) has it
    assert value == b"UNICODE\x00" + INFOTEXT.encode("utf-16-be")


def test_jpeg_drops_alpha_and_webp_keeps_it(tmp_path):
    jpg = images.save_image(_image("RGBA"), tmp_path, 1, "x, y: z", fmt="jpg", date=DAY)
    webp = images.save_image(_image("RGBA"), tmp_path, 1, "x, y: z", fmt="webp", date=DAY)
    with Image.open(jpg) as a, Image.open(webp) as b:
        assert (a.mode, b.mode) == ("RGB", "RGBA")
    assert images.read_infotext(jpg) == images.read_infotext(webp) == "x, y: z"


def test_jpeg_rejects_infotext_too_long_for_exif(tmp_path):
    with pytest.raises(InvalidParams, match="too long"):
        images.save_image(_image(), tmp_path, 1, "x" * 40000, fmt="jpg", date=DAY)
    assert list((tmp_path / DAY.isoformat()).iterdir()) == []


def test_jpeg_without_infotext_has_no_comment(tmp_path):
    path = images.save_image(_image(), tmp_path, 1, None, fmt="jpg", date=DAY)
    assert images.read_infotext(path) is None


def _jpeg_with_exif(exif: bytes | Image.Exif) -> bytes:
    out = io.BytesIO()
    _image().save(out, format="JPEG", exif=exif)
    return out.getvalue()


def test_reads_little_endian_user_comments_from_other_tools():
    # A little-endian TIFF with a little-endian UTF-16 comment (Pillow's own default layout).
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + INFOTEXT.encode("utf-16-le")
    assert images.read_infotext(_jpeg_with_exif(exif)) == INFOTEXT
    # Little-endian text inside a big-endian TIFF: decided by the text itself.
    exif = Image.Exif()
    exif.endian = ">"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "Steps: 20, Seed: 1".encode("utf-16-le")
    assert images.read_infotext(_jpeg_with_exif(exif)) == "Steps: 20, Seed: 1"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"UNICODE\x00" + "日本語".encode("utf-16-be"), "日本語"),  # no hint in the text: TIFF order (MM)
        (b"UNICODE\x00" + "\ufeffBOM text".encode("utf-16-le"), "BOM text"),
        (b"ASCII\x00\x00\x00Steps: 20", "Steps: 20"),
        (b"\x00" * 8 + b"undefined, Steps: 1", "undefined, Steps: 1"),
        (b"no prefix at all, Steps: 1", "no prefix at all, Steps: 1"),
        (b"UNICODE\x00" + "padded".encode("utf-16-be") + b"\x00\x00", "padded"),
    ],
)
def test_decode_user_comment_variants(raw, text):
    assert images.decode_user_comment(raw) == text


def test_decode_user_comment_uses_tiff_order_when_text_gives_no_hint():
    body = "日本語".encode("utf-16-le")
    assert images.decode_user_comment(b"UNICODE\x00" + body, "<") == "日本語"


def test_read_infotext_of_in_memory_image_and_plain_images(tmp_path):
    image = _image()
    image.info["parameters"] = "in memory, Steps: 1"
    assert images.read_infotext(image) == "in memory, Steps: 1"
    assert images.read_infotext(_image()) is None
    gif = tmp_path / "x.gif"
    _image().save(gif, comment=b"gif comment, Steps: 2")
    assert images.read_infotext(gif) == "gif comment, Steps: 2"


def test_read_infotext_rejects_non_images(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InvalidParams):
        images.read_infotext(path)
    with pytest.raises(InvalidParams):
        images.read_infotext(b"not an image")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_ignored():
    image = _image()
    image.info["exif"] = b"Exif\x00\x00MM\x00*\x00\x00\xff\xff"  # IFD offset past the end
    image.info["parameters"] = "fallback, Steps: 1"
    assert images.read_infotext(image) == "fallback, Steps: 1"


def test_saved_file_gets_the_usual_permissions(tmp_path):
    # mkstemp would create 0600 files; a published image gets what any new file gets under the umask.
    path = images.save_image(_image(), tmp_path, 1, None, date=DAY)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_paths_are_pathlib(tmp_path):
    assert isinstance(images.save_image(_image(), str(tmp_path), 1, None, date=DAY), Path)
