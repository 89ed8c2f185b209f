"""Reads on their way to a GPU: past the page cache (``O_DIRECT``) into page-locked chunk
buffers, as one stream of consecutive blocks that all reading threads take in turn.

The chunk stays what is hashed and checked; the block is what a thread reads. fastsafetensors
reads this way (16 threads, 512 KiB blocks from one queue, in file order) and loaded the device
machine's disk faster than distsave's thread per 16 MiB chunk did. Read in blocks, a GPU load
asks the disk as fastsafetensors does, and holds a buffer only for the chunks in flight; with
2 threads per core it came within 0.90-0.99x of fastsafetensors' time, from 0.83-0.94x
(benchmarks/RESULTS.md, ninth round). The thread that reads a chunk's last block hashes the
chunk and copies its pieces to their devices.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .checksum import Checksum
    from .tensor_io import Piece, _PinnedPool

__all__ = ["ALIGNMENT", "BLOCK_BYTES", "BlockReads", "open_direct", "page_span"]

BLOCK_BYTES = 512 * 1024
ALIGNMENT = 4096  # offsets and lengths of O_DIRECT reads: a page (a multiple of any block)


def page_span(length: int) -> int:
    """``length`` bytes rounded up to whole pages: what direct reads of them cover, and so the
    size a buffer needs to take them."""
    return -(-length // ALIGNMENT) * ALIGNMENT


def open_direct(fd: int) -> int | None:
    """A second descriptor of the open file ``fd`` (the same inode, whatever its name now) that
    reads past the page cache (``O_DIRECT``); None where the system has none. The kernel then
    copies nothing into its cache, and its read-ahead does not cap the rate."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


@dataclass(eq=False)
class _Chunk:
    """A chunk on its way through a page-locked buffer."""

    fd: int
    start: int
    end: int
    span: int  # page_span(end - start)
    pieces: list[Piece]
    done: Callable[[str | None], None]
    blocks_left: int
    staging: tuple[torch.Tensor, torch.cuda.Stream] | None = None
    view: memoryview | None = None
    refused: bool = False


class BlockReads:
    """Chunks read block by block, by any number of threads at once, through buffers of
    ``pool`` (page-locked, a CUDA stream each; `tensor_io._PinnedPool`)."""

    def __init__(self, pool: _PinnedPool, checksum: Checksum):
        self._pool, self._checksum = pool, checksum
        self._lock = threading.Lock()

    def blocks(self, fd: int, start: int, end: int, pieces: list[Piece],
               done: Callable[[str | None], None]) -> list[tuple[_Chunk, int]] | None:
        """The block reads that bring the chunk ``[start, end)`` of ``fd`` (an `open_direct`
        descriptor) in; None where it cannot be read direct (a start off the page grid, a chunk
        larger than the pool's buffers). ``pieces`` (file-ordered) receive their bytes, or, for
        bytes sources, are hashed as they are; the bytes between them are hashed as read. Once
        every block is read, ``done`` receives the chunk's digest, or None where a read was
        refused or came short: then the caller reads the chunk another way (and finds out why)."""
        span = page_span(end - start)
        if start % ALIGNMENT or span > self._pool.size:
            return None
        offsets = range(0, span, BLOCK_BYTES)
        chunk = _Chunk(fd, start, end, span, pieces, done, blocks_left=len(offsets))
        return [(chunk, at) for at in offsets]

    def read(self, block: tuple[_Chunk, int]) -> None:
        """Read one block of `blocks`; the chunk's last block read also hashes and places it."""
        chunk, at = block
        with self._lock:
            if chunk.staging is None:
                chunk.staging = self._pool.take()
                chunk.view = memoryview(chunk.staging[0].numpy())
                chunk.refused = chunk.staging[0].data_ptr() % ALIGNMENT != 0
        length = min(BLOCK_BYTES, chunk.span - at)
        if not chunk.refused:
            try:
                got = os.preadv(chunk.fd, [chunk.view[at:at + length]], chunk.start + at)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                got = -1
            if got < min(length, chunk.end - chunk.start - at):
                chunk.refused = True
        with self._lock:
            chunk.blocks_left -= 1
            if chunk.blocks_left:
                return
        digest = None if chunk.refused else self._place(chunk)
        self._pool.give(chunk.staging)
        chunk.done(digest)

    def _place(self, chunk: _Chunk) -> str:
        """Hash the chunk as read (header bytes as parsed, as the buffered read does) and copy
        each piece to its destination; its digest."""
        buffer, stream = chunk.staging
        digest = self._checksum.new()
        position = chunk.start
        with torch.cuda.stream(stream):
            for p in chunk.pieces:
                digest.update(chunk.view[position - chunk.start:p.offset - chunk.start])
                at = p.offset - chunk.start
                if isinstance(p.source, bytes):
                    digest.update(memoryview(p.source)[p.at:p.at + p.length])
                else:
                    digest.update(chunk.view[at:at + p.length])
                    p.source[p.at:p.at + p.length].copy_(buffer[at:at + p.length],
                                                         non_blocking=p.source.device.type != "cpu")
                position = p.offset + p.length
            digest.update(chunk.view[position - chunk.start:chunk.end - chunk.start])
        stream.synchronize()
        return digest.hexdigest()
