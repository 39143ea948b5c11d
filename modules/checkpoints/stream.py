"""Read a safetensors file's tensors straight into their final dtype, with a few threads, in one pass.

Every tensor gets its final storage first. The file is memory-mapped once, read-only; worker threads take it
in pieces of at most 2 MB, map each piece's pages in one call, convert the bytes straight from the
page cache into their final place, then unmap those pages again. So the weights are read from memory
once and written once, with no read() copy and no second full tensor; torch copies release the GIL,
so the workers run on separate cores.

Unmapping each piece after its conversion keeps the mapped file out of RSS: the process holds the
converted weights plus a piece or two per worker, not the file beside them.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.errors import CheckpointError

PIECE_BYTES = 1 << 21  # one worker's unit: mapped, converted, then unmapped
STAGE_ELEMENTS = 1 << 18  # fp32 staging for conversions between 16-bit floats (1 MB, stays in the L2 cache)
MAX_WORKERS = 4
_HALF_WIDTH = (torch.float16, torch.bfloat16)
_LINUX = sys.platform.startswith("linux")
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if _LINUX else None)  # Linux 5.14+; named in Python 3.13+
_POPULATE_WRITE = 23  # Linux 5.14+


@dataclass(frozen=True)
class Entry:
    """One tensor as the file's header describes it."""

    key: str
    stored: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in the file
    nbytes: int
    channels_last: bool = False  # lay a 4-D tensor out NHWC while reading it


@dataclass(frozen=True)
class Piece:
    key: str
    dest: torch.Tensor  # rows (slices along dim 0) of the tensor's final storage, or a flat slice of it
    offset: int  # in the file
    stored: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dest.numel() * self.stored.itemsize


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _empty(e: Entry, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The final tensor and the view whose rows the pieces fill: the tensor itself when it is NHWC
    (a row is one output channel, stored contiguously in the file), else its flat view."""
    target = _target(e.stored, dtype)
    if e.channels_last and len(e.shape) == 4 and math.prod(e.shape[1:]) * e.stored.itemsize <= PIECE_BYTES:
        tensor = torch.empty(e.shape, dtype=target, memory_format=torch.channels_last)
        return tensor, tensor
    tensor = torch.empty(e.shape, dtype=target)
    return tensor, tensor.view(-1)


def plan(entries: Iterable[Entry], dtype: torch.dtype | None, path: Path
         ) -> tuple[dict[str, torch.Tensor], list[Piece]]:
    """Empty final tensors for `entries` (floating ones in `dtype`) and the pieces that fill them."""
    out: dict[str, torch.Tensor] = {}
    pieces: list[Piece] = []
    for e in entries:
        if math.prod(e.shape) * e.stored.itemsize != e.nbytes:
            raise CheckpointError(f"Checkpoint {path} has a corrupt safetensors header: tensor {e.key} "
                                  f"of shape {list(e.shape)} does not take {e.nbytes} bytes")
        out[e.key], rows = _empty(e, dtype)
        if rows.numel() == 0:
            continue
        row_bytes = rows[0].numel() * e.stored.itemsize
        step = max(1, PIECE_BYTES // row_bytes)
        pieces += [Piece(e.key, rows[i:i + step], e.start + i * row_bytes, e.stored)
                   for i in range(0, rows.shape[0], step)]
    return out, pieces


class _Source:
    """The file mapped once, read-only, shared by every worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as file:
                self.size = os.fstat(file.fileno()).st_size
                # read-only and shared: a private writable map would be charged against memory
                # commit, and a file larger than RAM (a 24 GB FLUX.1) could not be mapped at all
                self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"Checkpoint {path} could not be memory-mapped for reading: {err}") from err
        with warnings.catch_warnings():  # "buffer is not writable": nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.advisable = hasattr(self.map, "madvise")  # not on Windows
        self.populate = _POPULATE_READ is not None and self.advisable
        self.prefault = _libc_madvise() is not None

    def close(self) -> None:
        self.bytes = None  # the map cannot close while a tensor still exports it
        try:
            self.map.close()
        except BufferError:  # a failed worker's traceback still holds a view: the map goes with it
            pass

    def check_size(self, entries: Iterable[Entry]) -> None:
        """Reading a mapped page past the end of the file would kill the process (SIGBUS)."""
        short = next((e for e in entries if e.start + e.nbytes > self.size), None)
        if short is not None:
            raise CheckpointError(f"Checkpoint {self.path} is truncated at tensor {short.key}")

    def advise(self, advice: int, start: int, end: int) -> bool:
        """madvise the pages holding bytes [start, end) of the file; False when the kernel refuses."""
        first = start - start % mmap.PAGESIZE
        try:
            self.map.madvise(advice, first, end - first)
        except (OSError, ValueError):
            return False
        return True


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise, for memory that Python's mmap module did not map (Linux only)."""
    if not _LINUX:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _prefault(dest: torch.Tensor) -> bool:
    """Fault the fresh pages under `dest` in with one call, not one fault per 4 KB page when they are
    first written (about a quarter of the load's system time here). False when the kernel refuses."""
    span = sum((n - 1) * s for n, s in zip(dest.shape, dest.stride(), strict=True)) + 1
    start, end = dest.data_ptr(), dest.data_ptr() + span * dest.element_size()
    first = start - start % mmap.PAGESIZE
    return _libc_madvise()(first, end - first, _POPULATE_WRITE) == 0


class _Reader:
    """One worker: converts pieces from the mapped file into place, through a small staging buffer."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.stage = torch.empty(0)
        self.scratch = torch.empty(0, dtype=torch.uint8)

    def fill(self, piece: Piece) -> None:
        start, end = piece.offset, piece.offset + piece.nbytes
        source = self.source
        if source.populate:  # map the piece's pages in one call, not one fault per 16; an old kernel refuses
            source.populate = source.advise(_POPULATE_READ, start, end)
        if source.prefault:
            source.prefault = _prefault(piece.dest)
        self._convert(self._src(piece).view(piece.dest.shape), piece.dest)
        if source.advisable:  # unmap the read pages: only the converted copy stays in RSS
            source.advise(mmap.MADV_DONTNEED, start, end)

    def _src(self, piece: Piece) -> torch.Tensor:
        """The piece's bytes as `piece.stored`, copied to an aligned buffer only when the file misaligns them."""
        raw = self.source.bytes[piece.offset:piece.offset + piece.nbytes]
        if piece.offset % piece.stored.itemsize == 0:
            return raw.view(piece.stored)
        if self.scratch.numel() < piece.nbytes:
            self.scratch = torch.empty(max(piece.nbytes, PIECE_BYTES), dtype=torch.uint8)
        return self.scratch[:piece.nbytes].copy_(raw).view(piece.stored)

    def _convert(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        """`dest.copy_(src)`; fp16 <-> bf16 goes through fp32 a stage at a time, which torch converts ~2x
        faster than its scalar direct cast. The stage stays in the CPU cache, so it adds no pass over memory.

        Bit-identical to a direct `.to()`, except that a NaN may come out with another sign or payload.
        """
        if src.dtype == dest.dtype or not (src.dtype in _HALF_WIDTH and dest.dtype in _HALF_WIDTH):
            dest.copy_(src)
            return
        if dest.dim() > 1 and not dest.is_contiguous():  # NHWC rows: stage whole rows
            row = dest[0].numel()
        else:
            src, dest, row = src.reshape(-1), dest.view(-1), 1
        rows = max(1, STAGE_ELEMENTS // row)
        if self.stage.numel() < rows * row:
            self.stage = torch.empty(max(rows * row, STAGE_ELEMENTS), dtype=torch.float32)
        for i in range(0, dest.shape[0], rows):
            part = src[i:i + rows]
            staged = self.stage[:part.numel()].view(part.shape)
            staged.copy_(part)
            dest[i:i + rows].copy_(staged)


def _drain(source: _Source, pieces: Iterator[Piece], lock: threading.Lock, failed: threading.Event,
           single_threaded: bool) -> None:
    """One worker: take the next piece until none is left or another worker failed."""
    if single_threaded:  # each worker converts on its own core; torch's pool would oversubscribe them
        torch.set_num_threads(1)
    reader = _Reader(source)
    try:
        while not failed.is_set():
            with lock:
                piece = next(pieces, None)
            if piece is None:
                return
            reader.fill(piece)
    except BaseException:
        failed.set()
        raise


def read_entries(path: Path, entries: list[Entry], dtype: torch.dtype | None,
                 workers: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `entries`, floating ones converted to `dtype` (None keeps the stored dtypes).

    `workers` defaults to torch's intra-op thread count, at most MAX_WORKERS. Raises CheckpointError
    when the file ends early.
    """
    out, pieces = plan(entries, dtype, path)
    if not pieces:
        return out
    source = _Source(path)
    try:
        source.check_size(entries)
        _run(source, pieces, workers)
    finally:
        source.close()
    return out


def _run(source: _Source, pieces: list[Piece], workers: int | None) -> None:
    threads = torch.get_num_threads()
    workers = max(1, min(workers or threads, MAX_WORKERS, len(pieces)))
    queue, lock, failed = iter(pieces), threading.Lock(), threading.Event()
    if workers == 1:
        _drain(source, queue, lock, failed, single_threaded=False)
        return
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-read") as pool:
            jobs = [pool.submit(_drain, source, queue, lock, failed, True) for _ in range(workers)]
        for job in jobs:
            job.result()
    finally:
        torch.set_num_threads(threads)  # torch takes a worker's setting as the default for new threads
