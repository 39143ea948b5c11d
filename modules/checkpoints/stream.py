"""Read a safetensors file's tensors straight into their final dtype, with a few threads, with no second copy.

Every tensor gets its final storage first. Worker threads then read the file in pieces of at most
2 MB into a buffer of their own, with plain reads, and convert each piece into its place. The piece
is still in the CPU cache when it is converted, so the weights cross main memory about once. Reads
and torch copies release the GIL, so one worker's read overlaps another's conversion.

Nothing is memory-mapped: mapped file pages count in RSS beside the converted weights. The process
holds the converted weights plus a few MB per worker.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.errors import CheckpointError

PIECE_BYTES = 1 << 21  # one read: small enough to stay in the cache until it is converted
STAGE_ELEMENTS = 1 << 18  # fp32 staging for conversions between 16-bit floats (1 MB)
MAX_WORKERS = 4
_HALF_WIDTH = (torch.float16, torch.bfloat16)


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


class _Reader:
    """One worker's file handle, read buffer and staging buffer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb", buffering=0)
        self.buffer = torch.empty(PIECE_BYTES, dtype=torch.uint8)
        self.view = memoryview(self.buffer.numpy())
        self.stage = torch.empty(0)

    def close(self) -> None:
        self.file.close()

    def fill(self, piece: Piece) -> None:
        self.file.seek(piece.offset)
        done = 0
        while done < piece.nbytes:
            got = self.file.readinto(self.view[done:piece.nbytes])
            if not got:
                raise CheckpointError(f"Checkpoint {self.path} is truncated at tensor {piece.key}")
            done += got
        self._convert(self.buffer[:piece.nbytes].view(piece.stored).view(piece.dest.shape), piece.dest)

    def _convert(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        """`dest.copy_(src)`; fp16 <-> bf16 goes through fp32 rows, which torch converts ~4x faster.

        Bit-identical to a direct `.to()`, except that a NaN may come out with another sign or payload.
        """
        if src.dtype == dest.dtype or not (src.dtype in _HALF_WIDTH and dest.dtype in _HALF_WIDTH):
            dest.copy_(src)
            return
        row = dest[0].numel() if dest.dim() > 1 else 1
        rows = max(1, STAGE_ELEMENTS // row)
        if self.stage.numel() < rows * row:
            self.stage = torch.empty(max(rows * row, STAGE_ELEMENTS), dtype=torch.float32)
        for i in range(0, dest.shape[0], rows):
            part = src[i:i + rows]
            staged = self.stage[:part.numel()].view(part.shape)
            staged.copy_(part)
            dest[i:i + rows].copy_(staged)


def _drain(path: Path, pieces: Iterator[Piece], lock: threading.Lock, failed: threading.Event,
           single_threaded: bool) -> None:
    """One worker: take the next piece until none is left or another worker failed."""
    if single_threaded:  # each worker converts on its own core; torch's pool would oversubscribe them
        torch.set_num_threads(1)
    reader = _Reader(path)
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
    finally:
        reader.close()


def read_entries(path: Path, entries: list[Entry], dtype: torch.dtype | None,
                 workers: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `entries`, floating ones converted to `dtype` (None keeps the stored dtypes).

    `workers` defaults to torch's intra-op thread count, at most MAX_WORKERS. Raises CheckpointError
    when the file ends early.
    """
    out, pieces = plan(entries, dtype, path)
    threads = torch.get_num_threads()
    workers = max(1, min(workers or threads, MAX_WORKERS, len(pieces)))
    queue, lock, failed = iter(pieces), threading.Lock(), threading.Event()
    if workers == 1:
        _drain(path, queue, lock, failed, single_threaded=False)
        return out
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-read") as pool:
            jobs = [pool.submit(_drain, path, queue, lock, failed, True) for _ in range(workers)]
        for job in jobs:
            job.result()
    finally:
        torch.set_num_threads(threads)  # torch takes a worker's setting as the default for new threads
    return out
