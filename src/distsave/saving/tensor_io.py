"""The tensor I/O engine: safetensors files written and read in parallel, hashed on the way.

A file is cut into `HASH_CHUNK_BYTES` chunks. Writers lay out the safetensors header first (so
every tensor's offset is known), then threads each take chunks: gather the bytes (staging GPU
tensors through a reusable pinned buffer), hash them, ``pwritev`` them at their offset. Readers
parse and check the header, let the caller compare it with what it expects before anything is
allocated, then threads ``preadv`` each chunk straight into the destination tensors (or, on the
way to a GPU, block by block into a pinned buffer with ``O_DIRECT``: `direct_reads`), hashing
the very bytes they place.
No byte is read twice. One pool of threads serves every file of a save or load at once, taking
the files' chunks in turn: file systems serialise work inside one file, not across files.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import itertools
import json
import math
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _libc
from .checksum import WRITTEN, Checksum
from .direct_reads import QUEUE_DEPTH, BlockReads, open_direct, page_span
from .errors import ArtifactError
from .format import HASH_CHUNK_BYTES, MAX_NAME_LENGTH, MAX_SAFETENSORS_HEADER_BYTES, TENSOR_ALIGNMENT
from .kernel_aio import KernelReads
from .pinned import PinnedPool

__all__ = ["DTYPES", "FileRecord", "Piece", "Segment", "TensorEntry", "TensorFile", "alongside", "chunk_digests",
           "failed_chunks", "flat_bytes", "in_turn", "io_threads", "layout", "parse_header", "read_files", "reserve",
           "run_parallel", "write_pieces", "write_safetensors"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_IOV_MAX = 512
_IO_THREADS = "DISTSAVE_IO_THREADS"


def io_threads(per_core: int = 1) -> int:
    """How many threads read, write and hash at once: ``$DISTSAVE_IO_THREADS``, else ``per_core``
    per core, counting 4 to 16 cores. Threads release the GIL while they read, write and hash,
    and storage wants several requests in flight, even on a small machine; network file systems
    want more. Threads that mostly wait on the disk take 2 per core: a GPU load's block reads
    where the kernel's queue is refused (`direct_reads`) kept 9-15 requests in flight with 16
    threads and ~29 with 32, 0.90-0.99x fastsafetensors' rate on the device machine
    (benchmarks/RESULTS.md, ninth round).

    Raises:
        ValueError: the variable is set to something other than a whole number from 1 to 1024.
    """
    value = os.environ.get(_IO_THREADS, "").strip()
    if not value:
        return per_core * max(4, min(16, os.cpu_count() or 1))
    if not value.isdigit() or not 1 <= int(value) <= 1024:
        raise ValueError(f"{_IO_THREADS}={value!r}: expected a whole number of threads from 1 to "
                         f"1024. Set it to, say, 16, or unset it for one per core from 4 to 16.")
    return int(value)


@dataclass(frozen=True)
class FileRecord:
    """What the manifest lists for a file: its size, one digest per chunk (`checksum.WRITTEN`),
    and where the chunks start when they are not the fixed `HASH_CHUNK_BYTES` grid."""

    bytes: int
    digests: list[str]
    starts: list[int] | None = None

    def to_json(self) -> dict:
        record: dict = {"bytes": self.bytes, WRITTEN.field: self.digests}
        if self.starts is not None:
            record["chunk_starts"] = self.starts
        return record


@dataclass(frozen=True)
class Segment:
    """One hashed run of bytes a writer placed: ``length`` bytes at ``start``."""

    start: int
    length: int
    digest: str


def chunk_digests(data: bytes | memoryview) -> FileRecord:
    """The record of an in-memory file (JSON files, small headers)."""
    view = memoryview(data)
    digests = [WRITTEN.of(view[i:i + HASH_CHUNK_BYTES]) for i in range(0, max(len(view), 1), HASH_CHUNK_BYTES)]
    return FileRecord(len(view), digests)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (same memory)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


@dataclass
class Piece:
    """``length`` bytes at file ``offset``, from/to ``source`` (flat uint8 tensor or bytes) at ``at``."""

    offset: int
    length: int
    source: torch.Tensor | bytes
    at: int

    @property
    def on_device(self) -> bool:
        """Whether the bytes come from or go to an accelerator (through page-locked memory)."""
        return not isinstance(self.source, bytes) and self.source.device.type != "cpu"


def _chunks(pieces: list[Piece], starts: list[int]) -> Iterator[tuple[int, list[Piece]]]:
    """Split file-ordered pieces at the chunk boundaries ``starts``: (chunk index, its pieces)."""
    index, current = -1, []
    for piece in pieces:
        offset, at, remaining = piece.offset, piece.at, piece.length
        while remaining:
            i = bisect.bisect_right(starts, offset) - 1
            end = starts[i + 1] if i + 1 < len(starts) else offset + remaining
            take = min(remaining, end - offset)
            if i != index:
                if current:
                    yield index, current
                index, current = i, []
            current.append(Piece(offset, take, piece.source, at))
            offset, at, remaining = offset + take, at + take, remaining - take
    if current:
        yield index, current


def _segments(pieces: list[Piece], chunk: int) -> Iterator[list[Piece]]:
    """Group file-ordered pieces into hashed segments: contiguous runs, cut at the ``chunk`` grid
    (a writer that holds whole chunks thus hashes exactly the grid's chunks)."""
    current: list[Piece] = []
    for piece in pieces:
        offset, at, remaining = piece.offset, piece.at, piece.length
        while remaining:
            take = min(remaining, (offset // chunk + 1) * chunk - offset)
            if current and (current[-1].offset + current[-1].length != offset or offset % chunk == 0):
                yield current
                current = []
            current.append(Piece(offset, take, piece.source, at))
            offset, at, remaining = offset + take, at + take, remaining - take
    if current:
        yield current


def _host_views(pieces: list[Piece], pool: PinnedPool | None) -> tuple[list[memoryview], tuple | None]:
    """Host memory for each piece: bytes and CPU tensors as they are, device tensors through
    one pinned buffer (returned, to give back to the pool once written)."""
    staging, used, places = None, 0, []
    for p in pieces:
        if p.on_device:
            staging = pool.take() if staging is None else staging
            with torch.cuda.stream(staging[1]):
                staging[0][used:used + p.length].copy_(p.source[p.at:p.at + p.length], non_blocking=True)
            places.append((used, p.length))
            used += p.length
        else:
            places.append(None)
    if staging is not None:
        staging[1].synchronize()
        pinned = memoryview(staging[0].numpy())
    views = []
    for p, place in zip(pieces, places):
        if place is not None:
            views.append(pinned[place[0]:place[0] + place[1]])
        elif isinstance(p.source, bytes):
            views.append(memoryview(p.source)[p.at:p.at + p.length])
        else:
            views.append(memoryview(p.source[p.at:p.at + p.length].numpy()))
    return views, staging


def layout(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header for tensors of these dtypes and shapes, and each one's absolute
    byte offset in the file.

    Data starts on a 64-byte boundary (the header is padded with spaces) and tensors whose size
    is a multiple of 64 bytes come first, so that each of them starts on one: a CPU load maps
    them in place (`mapped`). The others follow by element size, then name, each aligned to
    its element size as safetensors wants."""
    sizes = {name: dtype.itemsize * math.prod(shape) for name, (dtype, shape) in tensors.items()}
    order = sorted(tensors.items(), key=lambda item: (sizes[item[0]] % TENSOR_ALIGNMENT != 0, -item[1][0].itemsize, item[0]))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, offset = {}, 0
    for name, (dtype, shape) in order:
        if dtype not in _CODES:
            raise ValueError(f"Tensor {name!r} has dtype {dtype}, which safetensors cannot store.")
        nbytes = sizes[name]
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = offset
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % TENSOR_ALIGNMENT)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + o for name, o in offsets.items()}


def _for_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The logical, contiguous tensor to store (no autograd)."""
    return tensor.detach().contiguous()


def write_safetensors(files: dict[str | os.PathLike, dict[str, torch.Tensor]]) -> list[FileRecord]:
    """Write each ``path: tensors`` as one safetensors file (which must not exist), all files
    at once (`write_pieces`), each fsync'd; their records, in order.

    Raises:
        OSError: a file cannot be written (disk full, permissions); nothing is retried.
    """
    jobs, sizes, fds = [], [], []
    try:
        for path, tensors in files.items():
            tensors = {name: _for_storage(t) for name, t in tensors.items()}
            header, offsets = layout({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
            pieces = [Piece(0, len(header), header, 0)]
            pieces += [Piece(offsets[name], t.numel() * t.element_size(), flat_bytes(t), 0)
                       for name, t in sorted(tensors.items(), key=lambda item: offsets[item[0]]) if t.numel()]
            sizes.append(len(header) + sum(p.length for p in pieces[1:]))
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
            reserve(fds[-1], sizes[-1])
            jobs.append((fds[-1], pieces))
        written = write_pieces(jobs)
        run_parallel(os.fsync, fds, workers=len(fds))
    finally:
        for fd in fds:
            os.close(fd)
    return [FileRecord(size, [segment.digest for segment in segments]) for size, segments in zip(sizes, written)]


def write_pieces(files: list[tuple[int, list[Piece]]]) -> list[list[Segment]]:
    """Write each file's file-ordered, non-overlapping pieces at their offsets, hashing each
    segment (a contiguous run of pieces, cut at the `HASH_CHUNK_BYTES` grid) as it goes; each
    file's segments, in order.

    One pool of threads takes the segments of all files in turn, one file after another, so
    the files are written at once: a file system serialises the writes and block allocation
    inside one file (ext4 holds the file's lock), not across files.
    """
    devices = {p.source.device for _, pieces in files for p in pieces if p.on_device}
    pool = PinnedPool(next(iter(devices)), HASH_CHUNK_BYTES, huge_pages=False) if devices else None

    def write_segment(job: tuple[int, int, list[Piece]]) -> Segment:
        _, fd, segment = job
        views, staging = _host_views(segment, pool)
        digest = WRITTEN.new()
        for view in views:
            digest.update(view)
        for i in range(0, len(views), _IOV_MAX):
            _write_fully(fd, views[i:i + _IOV_MAX], segment[i].offset)
        length = sum(p.length for p in segment)
        _start_writeback(fd, segment[0].offset, length)
        if staging is not None:
            pool.give(staging)
        return Segment(segment[0].offset, length, digest.hexdigest())

    per_file = [[(index, fd, segment) for segment in _segments(pieces, HASH_CHUNK_BYTES)]
                for index, (fd, pieces) in enumerate(files)]
    jobs = in_turn(per_file)
    written: list[list[Segment]] = [[] for _ in files]
    try:
        for (index, _, _), segment in zip(jobs, run_parallel(write_segment, jobs)):
            written[index].append(segment)
    finally:
        if pool is not None:
            pool.close()
    return written


def in_turn(per_file: list[list[Any]]) -> list[Any]:
    """Every file's jobs, taken one file after another (first of each, second of each, ...), so
    a pool of threads works on all files at once."""
    return [job for turn in itertools.zip_longest(*per_file) for job in turn if job is not None]


_fallocate = _libc.function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def reserve(fd: int, size: int) -> None:
    """Give the empty file ``fd`` its final ``size``, its blocks reserved up front where the file
    system can (``fallocate``): writers then fill one contiguous run of the disk, in any order,
    where a sparse file gets its blocks in the order the threads' writes arrive (35 extents out
    of order for a 1 GB file on ext4), and every later read of the file pays for the jumps. A
    full disk fails here, before a byte is written.

    Raises:
        OSError: no space (ENOSPC) or another failure of the file system.
    """
    if size and _fallocate is not None and _fallocate(fd, 0, 0, size) != 0:
        error = ctypes.get_errno()
        if error not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(error, os.strerror(error))
    os.ftruncate(fd, size)  # where fallocate is missing; a no-op after it


def _writeback_starter() -> Callable[[int, int, int], None]:
    """``start(fd, offset, length)``: ask the kernel to begin writing a range to disk now, so
    the final fsync finds little left and the disk stays busy while threads write (Linux
    ``sync_file_range``; elsewhere nothing)."""
    call = _libc.function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if call is None:
        return lambda fd, offset, length: None
    return lambda fd, offset, length: call(fd, offset, length, _SYNC_FILE_RANGE_WRITE) and None


_SYNC_FILE_RANGE_WRITE = 2
_start_writeback = _writeback_starter()


def _write_fully(fd: int, views: list[memoryview], offset: int) -> None:
    total = sum(len(v) for v in views)
    written = os.pwritev(fd, views, offset)
    while written < total:  # a short write: continue where it stopped
        flat = b"".join(bytes(v) for v in views)[written:]
        step = os.pwrite(fd, flat, offset + written)
        if step == 0:
            raise OSError(f"write returned 0 bytes at offset {offset + written}")
        written += step


def run_parallel(work: Callable[[Any], Any], jobs: list, workers: int | None = None) -> list:
    """``[work(job) for job in jobs]`` on up to ``workers`` threads (default `io_threads`); the
    first error is raised.

    Plain threads, not an executor: a background save that runs while the interpreter exits
    must still be able to start them (executors refuse new work at shutdown).
    """
    if len(jobs) <= 1:
        return [work(job) for job in jobs]
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    pending = iter(enumerate(jobs))
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                results[item[0]] = work(item[1])
            except BaseException as error:  # handed to the caller below
                errors.append(error)

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(workers or io_threads(), len(jobs)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def alongside(background: Callable[[], Any], foreground: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``background`` in a thread while ``foreground`` runs in the caller's thread (which keeps
    work that is not thread-safe, such as ``torch.export``); return both results once both end.

    Raises:
        The foreground's error, else the background's.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = background()
        except BaseException as error:  # raised below, in the caller's thread
            outcome["error"] = error

    with _frequent_gil_handoffs():
        thread = threading.Thread(target=run, name="distsave-write", daemon=True)
        thread.start()
        try:
            result = foreground()
        finally:
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], result


@contextlib.contextmanager
def _frequent_gil_handoffs(seconds: float = 0.0005) -> Iterator[None]:
    """Let the interpreter hand the GIL over every ``seconds`` (default 0.5 ms, not Python's 5 ms)
    while I/O threads share it with Python-heavy work (an export, an import). Each chunk a
    thread moves needs the GIL a few times between its system calls; against a busy thread the
    default lets about 200 handoffs a second through, which caps 16 MiB chunks near 0.6 GB/s."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


# -- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass
class TensorFile:
    """An opened safetensors file whose header was parsed and checked."""

    name: str
    fd: int
    size: int
    header: bytes
    entries: dict[str, TensorEntry] = field(default_factory=dict)


def parse_header(name: str, fd: int, size: int) -> TensorFile:
    """Read and check a safetensors header: known dtypes, shapes that match their byte ranges,
    ranges that tile the data exactly, inside the file.

    Raises:
        ArtifactError: naming the file and the entry that is wrong.
    """
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{name} is not a valid safetensors file: {what}. The artifact is "
                             "damaged or hostile; re-save the model or restore a good copy.")

    if size < 8:
        raise bad(f"it has {size} bytes, fewer than the 8-byte header length")
    length = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
    if length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
        raise bad(f"its header claims {length} bytes (file: {size}, limit: {MAX_SAFETENSORS_HEADER_BYTES})")
    text = os.pread(fd, length, 8)
    if len(text) != length:
        raise bad("the file is shorter than its header")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise bad(f"its header is not JSON ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_start, spans, entries = 8 + length, [], {}
    for key, value in header.items():
        if key == "__metadata__":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise bad("__metadata__ is not a map of strings")
            continue
        entries[key] = _entry(key, value, data_start, bad)
        spans.append((entries[key].start, entries[key].start + entries[key].nbytes, key))
    position = data_start
    for begin, end, key in sorted(spans):
        if begin != position:
            raise bad(f"tensor {key!r} starts at byte {begin - data_start} of the data, expected "
                      f"{position - data_start} (holes and overlaps are not allowed)")
        position = end
    if position != size:
        raise bad(f"its tensors cover {position - data_start} data bytes but the file holds {size - data_start}")
    return TensorFile(name, fd, size, struct.pack("<Q", length) + text, entries)


def _entry(key: str, value: object, data_start: int, bad) -> TensorEntry:
    if len(key) > MAX_NAME_LENGTH:
        raise bad(f"a tensor name is longer than {MAX_NAME_LENGTH} characters")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry {key!r} should have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    shape, offsets = value["shape"], value["data_offsets"]
    if dtype is None:
        raise bad(f"entry {key!r} has unknown dtype {value['dtype']!r}")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)):
        raise bad(f"entry {key!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**62 for o in offsets)):
        raise bad(f"entry {key!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"entry {key!r}: shape {shape} of {value['dtype']} needs {nbytes} bytes, its "
                  f"offsets span {offsets[1] - offsets[0]}")
    return TensorEntry(key, dtype, tuple(shape), data_start + offsets[0], nbytes)


def read_files(files: list[tuple[TensorFile, dict[str, tuple[torch.Tensor, int]], list[str], list[int]]],
               checksum: Checksum) -> list[list[int]]:
    """Read bytes of each file's tensors into destinations, hashing every chunk on the way.

    Each job is ``(file, wanted, digests, chunk starts)``; ``wanted`` maps a tensor name to
    ``(destination, first byte)``: the destination (contiguous, any device, any dtype) receives
    its byte size of the tensor's stored bytes from that byte on; all of a tensor, or the slice
    one process owns. Every chunk that holds a wanted byte, and the header's, is read whole
    (bytes nobody wants go to a scratch buffer) so it can be checked. One pool of threads takes
    the chunks of all files in turn, as `write_pieces` does; on the way to a GPU it takes them
    file after file instead, in blocks (`direct_reads`).

    Returns:
        For each file, the indices of chunks read whose ``checksum`` differs from its digests.
    """
    per_file, devices, largest = [], set(), 0
    for index, (file, wanted, digests, starts) in enumerate(files):
        pieces = [Piece(0, len(file.header), file.header, 0)]
        for name, (destination, first) in sorted(wanted.items(),
                                                 key=lambda item: file.entries[item[0]].start + item[1][1]):
            flat = flat_bytes(destination)
            if flat.numel():
                pieces.append(Piece(file.entries[name].start + first, flat.numel(), flat, 0))
                if flat.device.type != "cpu":
                    devices.add(flat.device)
        ends = starts[1:] + [file.size]
        largest = max([largest] + [end - start for start, end in zip(starts, ends)])
        per_file.append([_ChunkRead(index, chunk, starts[chunk], ends[chunk], chunk_pieces)
                         for chunk, chunk_pieces in _chunks(pieces, starts)])
    pool = PinnedPool(next(iter(devices)), page_span(largest), huge_pages=True) if devices else None
    direct = [open_direct(file.fd) if devices else None for file, *_ in files]
    jobs = [job for jobs_of_file in per_file for job in jobs_of_file] if devices else in_turn(per_file)
    passed = [False] * len(jobs)

    def check(number: int, hexdigest: str) -> None:
        digests = files[jobs[number].file][2]
        passed[number] = jobs[number].chunk < len(digests) and hexdigest == digests[jobs[number].chunk]

    def read_chunk(number: int) -> None:
        job = jobs[number]
        check(number, _read_chunk(files[job.file][0], _fill_gaps(job.pieces, job.start, job.end),
                                  pool if job.staged else None, checksum))

    def placed(number: int) -> Callable[[str | None], None]:
        return lambda hexdigest: read_chunk(number) if hexdigest is None else check(number, hexdigest)

    blocks = BlockReads(pool, checksum) if pool is not None else None
    block_reads, chunk_reads = [], []
    for number, job in enumerate(jobs):
        in_blocks = (blocks.blocks(direct[job.file], job.start, job.end, job.pieces, placed(number))
                     if job.staged and direct[job.file] is not None else None)
        if in_blocks:
            block_reads.extend(in_blocks)
        else:
            chunk_reads.append(number)
    kernel = KernelReads.open(QUEUE_DEPTH) if block_reads else None
    if kernel is not None:  # one job of the pool, which closes the kernel: chunks read another way overlap it
        block_jobs = [(lambda reads: blocks.stream(kernel, reads), block_reads)]
    else:
        block_jobs = [(blocks.read, block) for block in block_reads]
    try:
        run_parallel(lambda read: read[0](read[1]), block_jobs + [(read_chunk, n) for n in chunk_reads],
                     workers=io_threads(per_core=2) if devices else None)
    finally:
        for fd in direct:
            if fd is not None:
                os.close(fd)
        if pool is not None:
            pool.close()
    return failed_chunks(len(files), [(job.file, job.chunk) for job in jobs], passed)


@dataclass(frozen=True)
class _ChunkRead:
    """The chunk ``[start, end)`` of file number ``file``: the ``pieces`` of it to place."""

    file: int
    chunk: int
    start: int
    end: int
    pieces: list[Piece]

    @property
    def staged(self) -> bool:
        """Whether a piece goes to a device (through page-locked memory)."""
        return any(p.on_device for p in self.pieces)


def _read_chunk(file: TensorFile, pieces: list[Piece], pool: PinnedPool | None, checksum: Checksum) -> str:
    """Read the pieces covering a chunk through the page cache (device pieces staged through a
    buffer of ``pool``); the digest of what was placed."""
    staging = pool.take() if pool is not None else None
    digest = checksum.new()
    used = 0
    for group in _contiguous_reads(pieces):
        if isinstance(group[0].source, bytes):
            for p in group:
                digest.update(memoryview(p.source)[p.at:p.at + p.length])
            continue
        if staging is None:
            views = [memoryview(p.source[p.at:p.at + p.length].numpy()) for p in group]
        else:
            total = sum(p.length for p in group)
            views = [memoryview(staging[0][used:used + total].numpy())]
        _read_fully(file, views, group[0].offset)
        for view in views:
            digest.update(view)
        if staging is not None:
            with torch.cuda.stream(staging[1]):
                for p in group:
                    p.source[p.at:p.at + p.length].copy_(staging[0][used:used + p.length],
                                                         non_blocking=p.on_device)
                    used += p.length
    if staging is not None:
        staging[1].synchronize()
        pool.give(staging)
    return digest.hexdigest()


def failed_chunks(files: int, jobs: list[tuple], passed: list[bool]) -> list[list[int]]:
    """For each of ``files`` files, the indices of its chunks whose check did not pass; each
    job starts ``(file index, chunk index, ...)`` and ``passed`` holds its check's outcome."""
    failed: list[list[int]] = [[] for _ in range(files)]
    for (index, chunk, *_), ok in zip(jobs, passed):
        if not ok:
            failed[index].append(chunk)
    return failed


def _fill_gaps(pieces: list[Piece], start: int, end: int) -> list[Piece]:
    """The chunk ``[start, end)`` covered whole: ``pieces`` plus scratch buffers for the bytes
    between them (bytes this reader does not keep but must hash)."""
    covered, position = [], start
    for p in pieces + [Piece(end, 0, b"", 0)]:
        if p.offset > position:
            covered.append(Piece(position, p.offset - position, torch.empty(p.offset - position, dtype=torch.uint8), 0))
        if p.length:
            covered.append(p)
        position = p.offset + p.length
    return covered


def _contiguous_reads(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """Group a chunk's pieces into runs read by one ``preadv`` (header bytes stay apart)."""
    group: list[Piece] = []
    for p in pieces:
        if group and (isinstance(p.source, bytes) != isinstance(group[0].source, bytes)
                      or len(group) == _IOV_MAX):
            yield group
            group = []
        group.append(p)
    if group:
        yield group


def _read_fully(file: TensorFile, views: list[memoryview], offset: int) -> None:
    total = sum(len(v) for v in views)
    got = os.preadv(file.fd, views, offset)
    if got != total:
        raise ArtifactError(f"{file.name} changed while it was read (expected {total} bytes at "
                            f"offset {offset}, got {got}). Load again once no one writes the artifact.")
