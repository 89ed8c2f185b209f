"""Reads on their way to a GPU: past the page cache (``O_DIRECT``) into page-locked chunk
buffers, as one stream of consecutive blocks.

The chunk stays what is hashed and checked; the block is what is read. fastsafetensors reads
this way (16 threads, 512 KiB blocks from one queue, in file order) and loaded the device
machine's disk faster than distsave's thread per 16 MiB chunk did. The blocks are kept in flight
by the kernel (`kernel_aio`, `BlockReads.stream`: one thread submits, a few hash and place), or,
where the kernel refuses that, read by threads that take them in turn (`BlockReads.read`).
On the device machine, Python threads came within 0.77-0.99x of fastsafetensors' time and the
kernel's queue within 0.84-0.99x, with the disk seeing fastsafetensors' request shape
(benchmarks/RESULTS.md, ninth to eleventh rounds). Whoever completes a chunk's last block hashes
the chunk and copies its pieces to their devices.
"""

from __future__ import annotations

import collections
import errno
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .checksum import Checksum
    from .kernel_aio import KernelReads
    from .pinned import PinnedPool
    from .tensor_io import Piece

__all__ = ["ALIGNMENT", "BLOCK_BYTES", "BlockReads", "open_direct", "page_span"]

BLOCK_BYTES = 512 * 1024
ALIGNMENT = 4096  # offsets and lengths of O_DIRECT reads: a page (a multiple of any block)
QUEUE_DEPTH = 16  # kernel reads in flight, as fastsafetensors' 16 threads keep (8 MiB of 512 KiB blocks)
PLACING_THREADS = 4  # hash + copy to the device: ~2 ms per 16 MiB chunk, ~8 chunks/s per GB/s
HELD_CHUNKS = 16  # chunks with a buffer at once: those read into plus those waiting to be placed


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


def _failed_read(fd: int, code: int) -> OSError:
    """The error of a direct read of ``fd`` that the system failed (not one it refused), naming
    the file it reads."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = f"file descriptor {fd}"
    return OSError(code, f"{os.strerror(code)} while reading for a load onto a GPU; the disk or file "
                         "system failed, not the artifact's check (try the load again, check the disk)", name)


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

    def read_ended(self, at: int, length: int, result: int) -> None:
        """Take the outcome of the block read at ``at`` (bytes read, or -errno): a refused or
        short read sends the chunk to the buffered reader; a failed one is raised, naming the file."""
        if result < 0 and -result not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise _failed_read(self.fd, -result)
        if result < min(length, self.end - self.start - at):
            self.refused = True


class BlockReads:
    """Chunks read block by block, by any number of threads at once (`read`) or kept in flight
    by the kernel (`stream`), through buffers of ``pool`` (page-locked, a CUDA stream each;
    `pinned.PinnedPool`)."""

    def __init__(self, pool: PinnedPool, checksum: Checksum):
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
                self._stage(chunk)
        length = min(BLOCK_BYTES, chunk.span - at)
        if not chunk.refused:
            try:
                got = os.preadv(chunk.fd, [chunk.view[at:at + length]], chunk.start + at)
            except OSError as error:
                got = -(error.errno or errno.EIO)
            chunk.read_ended(at, length, got)
        with self._lock:
            chunk.blocks_left -= 1
            if chunk.blocks_left:
                return
        self._finish(chunk)

    def stream(self, kernel: KernelReads, blocks: list[tuple[_Chunk, int]]) -> None:
        """Read ``blocks`` (as `BlockReads.blocks` gives them), in their order, with ``kernel``
        keeping its depth of reads in flight from one thread; `PLACING_THREADS` hash and place
        each chunk once its last block is in. At most `HELD_CHUNKS` chunks hold a buffer at once."""
        ready: queue.SimpleQueue[_Chunk | None] = queue.SimpleQueue()
        buffers = threading.BoundedSemaphore(HELD_CHUNKS)
        errors: list[BaseException] = []

        def place() -> None:
            while (chunk := ready.get()) is not None:
                try:
                    if not errors:
                        self._finish(chunk)
                except BaseException as error:  # raised by the caller below
                    errors.append(error)
                finally:
                    buffers.release()

        placers = [threading.Thread(target=place, daemon=True) for _ in range(PLACING_THREADS)]
        for thread in placers:
            thread.start()
        try:
            self._keep_in_flight(kernel, collections.deque(blocks), ready, buffers, errors)
        finally:
            kernel.close()
            for _ in placers:
                ready.put(None)
            for thread in placers:
                thread.join()
        if errors:
            raise errors[0]

    def _keep_in_flight(self, kernel: KernelReads, pending: collections.deque[tuple[_Chunk, int]],
                        ready: queue.SimpleQueue, buffers: threading.BoundedSemaphore,
                        errors: list[BaseException]) -> None:
        """Submit blocks while a slot (and, for a chunk's first block, a buffer) is free, reap
        what has ended, and hand each chunk whose blocks are all in to ``ready``."""
        free, in_flight = list(range(kernel.depth)), {}

        def ended(chunk: _Chunk) -> None:
            chunk.blocks_left -= 1
            if not chunk.blocks_left:
                ready.put(chunk)

        while (pending or in_flight) and not errors:
            while pending and free:
                chunk, at = pending[0]
                if chunk.staging is None:
                    if not buffers.acquire(blocking=not in_flight):
                        break
                    self._stage(chunk)
                pending.popleft()
                length = min(BLOCK_BYTES, chunk.span - at)
                if chunk.refused:
                    ended(chunk)
                    continue
                slot = free.pop()
                kernel.submit(slot, chunk.fd, chunk.staging[0].data_ptr() + at, length, chunk.start + at)
                in_flight[slot] = (chunk, at, length)
            if not in_flight:
                continue
            for slot, result in kernel.reap(1):
                chunk, at, length = in_flight.pop(slot)
                free.append(slot)
                chunk.read_ended(at, length, result)
                ended(chunk)

    def _stage(self, chunk: _Chunk) -> None:
        """Give ``chunk`` a page-locked buffer to read into (refused where it is off the page grid)."""
        chunk.staging = self._pool.take()
        chunk.view = memoryview(chunk.staging[0].numpy())
        chunk.refused = chunk.staging[0].data_ptr() % ALIGNMENT != 0

    def _finish(self, chunk: _Chunk) -> None:
        """Hash and place a chunk whose blocks are all read, give its buffer back and report its
        digest (None where a read was refused or short)."""
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
                    p.source[p.at:p.at + p.length].copy_(buffer[at:at + p.length], non_blocking=p.on_device)
                position = p.offset + p.length
            digest.update(chunk.view[position - chunk.start:chunk.end - chunk.start])
        stream.synchronize()
        return digest.hexdigest()
