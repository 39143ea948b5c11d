"""The threaded piece reader: bit-identical to safetensors' own reader, NHWC on request, clear errors."""
from __future__ import annotations

import json
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.checkpoints import stream
from modules.checkpoints.load import load_checkpoint
from modules.checkpoints.model import CheckpointInfo
from modules.checkpoints.read import read_state_dict, safetensors_entries
from modules.errors import CheckpointError


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 4 KB and 100-element staging, so small tensors take many pieces and stages."""
    monkeypatch.setattr(stream, "PIECE_BYTES", 4096)
    monkeypatch.setattr(stream, "STAGE_ELEMENTS", 100)


def _mixed_file(tmp_path, stored: torch.dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(37, 301, generator=g) * 3e4,  # spans pieces; some overflow fp16 to inf
        "conv.weight": torch.randn(12, 8, 3, 3, generator=g),
        "wide.weight": torch.randn(2, 2048, 1, 1, generator=g),  # one row exceeds a 4 KB piece
        "tiny": torch.tensor([1e-8, -0.0, 65504.0, float("nan")]),  # subnormal / signed zero / max / nan
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    tensors = {k: v.to(stored) for k, v in tensors.items()}
    tensors["ids"] = torch.arange(77, dtype=torch.int64).reshape(1, 77)
    path = tmp_path / f"mixed-{str(stored).split('.')[-1]}.safetensors"
    save_file(tensors, str(path))
    return path


def _entries(path):
    return safetensors_entries(path, channels_last=("conv",))


@pytest.mark.parametrize("stored", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("workers", [1, 3])
def test_pieces_match_safetensors_then_to(tmp_path, small_pieces, stored, dtype, workers):
    path = _mixed_file(tmp_path, stored)
    want = load_file(str(path))
    got = stream.read_entries(path, _entries(path), dtype, workers=workers)
    assert got.keys() == want.keys()
    for key, value in want.items():
        expect = value.to(dtype) if value.is_floating_point() else value
        assert got[key].dtype == expect.dtype and got[key].shape == expect.shape, key
        assert _bits_equal(got[key], expect), key


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit whatever a's memory layout, except that a NaN need only meet a NaN
    (fp16 -> bf16 through fp32 keeps NaN a NaN but not its sign and payload bits)."""
    if a.numel() == 0:
        return b.numel() == 0
    a, b = a.contiguous(), b.contiguous()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if not a.is_floating_point():
        return torch.equal(a.view(ints), b.view(ints))
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def test_channels_last_on_request_only(tmp_path, small_pieces):
    path = _mixed_file(tmp_path, torch.float16)
    got = stream.read_entries(path, _entries(path), torch.bfloat16, workers=2)
    assert got["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not got["conv.weight"].is_contiguous()
    assert got["wide.weight"].is_contiguous()  # not asked for
    assert _bits_equal(got["conv.weight"], load_file(str(path))["conv.weight"].to(torch.bfloat16))


def test_channels_last_falls_back_when_a_row_outgrows_a_piece(tmp_path, small_pieces):
    path = _mixed_file(tmp_path, torch.float32)
    entries = [stream.Entry(e.key, e.stored, e.shape, e.start, e.nbytes, channels_last=True) for e in _entries(path)]
    got = stream.read_entries(path, entries, torch.float32, workers=2)
    assert got["wide.weight"].is_contiguous()  # 2048 fp32 elements per row > 4 KB
    assert got["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert _bits_equal(got["wide.weight"], load_file(str(path))["wide.weight"])


def test_read_state_dict_channels_last_prefix(tmp_path):
    path = _mixed_file(tmp_path, torch.float16)
    got = read_state_dict(path, dtype=torch.bfloat16, channels_last=("conv.",))
    assert got["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert got["wide.weight"].is_contiguous()


def test_short_file_is_a_clear_error_and_threads_are_restored(tmp_path, small_pieces):
    path = _mixed_file(tmp_path, torch.float16)
    entries = _entries(path)
    path.write_bytes(path.read_bytes()[:-300])  # past the header check, straight to the reader
    before = torch.get_num_threads()
    with pytest.raises(CheckpointError, match="truncated at tensor"):
        stream.read_entries(path, entries, torch.bfloat16, workers=3)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]


def test_header_that_disagrees_with_shape_is_refused(tmp_path):
    path = _mixed_file(tmp_path, torch.float16)
    entries = [stream.Entry(e.key, e.stored, (e.shape[0] + 1, *e.shape[1:]) if e.key == "big" else e.shape,
                            e.start, e.nbytes) for e in _entries(path)]
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        stream.read_entries(path, entries, torch.bfloat16)


def test_vae_read_as_nhwc_matches_the_contiguous_load(tiny_sd1):
    info = CheckpointInfo(tiny_sd1, "tiny-sd1", "safetensors")
    plain = load_checkpoint(info, device="cpu", dtype=torch.bfloat16)
    nhwc = load_checkpoint(info, device="cpu", dtype=torch.bfloat16, channels_last_vae=True)
    convs = {n: p for n, p in nhwc.vae.named_parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)}
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs.values())
    assert all(p.is_contiguous() for p in nhwc.unet.parameters())
    for (name, a), (_, b) in zip(plain.vae.state_dict().items(), nhwc.vae.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_every_fp16_bit_pattern_rounds_like_torch(tmp_path, small_pieces):
    """All 65,536 fp16 values (subnormals, infinities, ties) and fp32 ties at bf16's rounding point:
    round to nearest even, bit for bit as `.to(torch.bfloat16)`, from the memory-mapped pieces."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halfway = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0xBF818000, 0x7F7F8000, 0x00008000],
                           dtype=torch.int64).to(torch.int32).view(torch.float32)  # exact ties, odd and even
    path = tmp_path / "bits.safetensors"
    save_file({"every": every.reshape(256, 256), "halfway": halfway}, str(path))
    got = stream.read_entries(path, _entries(path), torch.bfloat16, workers=2)
    assert _bits_equal(got["every"], every.reshape(256, 256).to(torch.bfloat16))
    assert _bits_equal(got["halfway"], halfway.to(torch.bfloat16))
    assert got["halfway"].view(torch.int16)[0].item() == 0x3F80  # a tie to the even neighbour, not up


def _misaligned_file(path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file whose tensors start at odd offsets (the format does not require alignment)."""
    names = {np.dtype(np.uint8): "U8", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header, offset = {}, 0
    for key, value in tensors.items():
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(v.tobytes() for v in tensors.values()))


def test_misaligned_tensors_are_read_through_an_aligned_copy(tmp_path, small_pieces):
    rng = np.random.default_rng(0)
    tensors = {"odd": np.arange(3, dtype=np.uint8), "half": rng.standard_normal((40, 50)).astype(np.float16),
               "single": rng.standard_normal(1001).astype(np.float32)}
    path = tmp_path / "misaligned.safetensors"
    _misaligned_file(path, tensors)
    got = read_state_dict(path, dtype=torch.bfloat16)
    for key, value in tensors.items():
        want = torch.from_numpy(value.copy())
        want = want.to(torch.bfloat16) if want.is_floating_point() else want
        assert _bits_equal(got[key], want), key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_file_is_unmapped_after_reading(tmp_path, small_pieces):
    path = _mixed_file(tmp_path, torch.float16)
    got = stream.read_entries(path, _entries(path), torch.bfloat16, workers=2)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert got["big"].untyped_storage().nbytes() == 37 * 301 * 2  # its own storage, not a view of the file


def test_a_kernel_that_refuses_the_page_population_calls_still_reads_correctly(tmp_path, small_pieces, monkeypatch):
    monkeypatch.setattr(stream, "_POPULATE_READ", 12345)  # no such advice: madvise fails with EINVAL
    monkeypatch.setattr(stream, "_POPULATE_WRITE", 12345)
    path = _mixed_file(tmp_path, torch.float16)
    got = stream.read_entries(path, _entries(path), torch.bfloat16, workers=2)
    for key, value in load_file(str(path)).items():
        assert _bits_equal(got[key], value.to(torch.bfloat16) if value.is_floating_point() else value), key
