"""A probe, not distsave's reader: Linux ``io_uring`` in place of kernel AIO (`kernel_aio`),
with the page-locked buffers registered once, so a read does not pin its 128 pages each time
(about half of an ``io_submit`` of 512 KiB on the CPU machine; benchmarks/RESULTS.md, twelfth
round). `UringReads` has `KernelReads`' interface, so `direct_reads.BlockReads` runs it as
it is; each read is its own ``io_uring_enter``, the request shape of the committed reader (no
batch for the block layer to merge). x86-64 only: the rings are shared memory read and written
from Python, which relies on its stores not being reordered.

    PYTHONPATH=src python3 benchmarks/uring_reads.py     # what one submit costs, both ways
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import platform

from distsave import _libc

_SETUP, _ENTER, _REGISTER = 425, 426, 427
_READ_FIXED, _READ = 4, 22
_GETEVENTS = 1
_BUFFERS2, _BUFFERS_UPDATE, _SPARSE = 15, 16, 1
_OFF_SQES = 0x10000000
_TABLE = 64  # registered buffers at most

_syscall = _libc.function("syscall", [ctypes.c_long])

# (data pointer, size) of every page-locked buffer the load read into, sorted; filled by
# `gpu_load_variants.read_through_uring`, which wraps `BlockReads._stage`
BUFFERS: list[tuple[int, int]] = []
# buffers registered and refused by the last ring, for the probe's record (`gpu_load_variants`
# hands its phases in)
COUNTS: dict[str, float] = {}


class _Offsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags_or_overflow", ctypes.c_uint32),
                ("dropped_or_cqes", ctypes.c_uint32), ("array_or_flags", ctypes.c_uint32),
                ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _Offsets), ("cq_off", _Offsets)]


class _RsrcRegister(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("resv2", ctypes.c_uint64),
                ("data", ctypes.c_uint64), ("tags", ctypes.c_uint64)]


class _RsrcUpdate(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint32), ("resv", ctypes.c_uint32), ("data", ctypes.c_uint64),
                ("tags", ctypes.c_uint64), ("nr", ctypes.c_uint32), ("resv2", ctypes.c_uint32)]


class _Sqe(ctypes.Structure):
    """``struct io_uring_sqe`` of <linux/io_uring.h>, the fields a read uses."""

    _fields_ = [("opcode", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("ioprio", ctypes.c_uint16),
                ("fd", ctypes.c_int32), ("off", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32), ("user_data", ctypes.c_uint64),
                ("buf_index", ctypes.c_uint16), ("personality", ctypes.c_uint16),
                ("splice_fd_in", ctypes.c_int32), ("addr3", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


class _Cqe(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _call(number: int, *args) -> int:
    while True:
        got = _syscall(ctypes.c_long(number), *args)
        if got >= 0:
            return got
        code = ctypes.get_errno()
        if code not in (errno.EINTR, errno.EAGAIN):
            raise OSError(code, f"io_uring system call {number}: {os.strerror(code)}")


class UringReads:
    """Up to ``depth`` reads in flight, each named by a slot below ``depth``, as `KernelReads`."""

    def __init__(self, fd: int, params: _Params, depth: int):
        self.depth, self._fd = depth, fd
        sq, cq = params.sq_off, params.cq_off
        ring_bytes = max(sq.array_or_flags + params.sq_entries * 4, cq.dropped_or_cqes + params.cq_entries * ctypes.sizeof(_Cqe))
        self._ring = mmap.mmap(fd, ring_bytes, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._sqes = mmap.mmap(fd, params.sq_entries * ctypes.sizeof(_Sqe), mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
        word = lambda at: ctypes.c_uint32.from_buffer(self._ring, at)  # noqa: E731
        self._sq_tail, self._sq_mask = word(sq.tail), word(sq.ring_mask).value
        self._sq_array = (ctypes.c_uint32 * params.sq_entries).from_buffer(self._ring, sq.array_or_flags)
        self._cq_head, self._cq_tail, self._cq_mask = word(cq.head), word(cq.tail), word(cq.ring_mask).value
        self._cqes = (_Cqe * params.cq_entries).from_buffer(self._ring, cq.dropped_or_cqes)
        self._sqe_entries = (_Sqe * params.sq_entries).from_buffer(self._sqes)
        self._registered: list[tuple[int, int]] = []  # (data pointer, size) at its table index
        self._refused: set[tuple[int, int]] = set()  # buffers the kernel would not register
        self._in_flight = 0
        table = _RsrcRegister(nr=_TABLE, flags=_SPARSE)
        _call(_REGISTER, ctypes.c_uint(fd), ctypes.c_uint(_BUFFERS2), ctypes.byref(table),
              ctypes.c_uint(ctypes.sizeof(table)))

    @classmethod
    def open(cls, depth: int) -> UringReads | None:
        """A ring for ``depth`` reads in flight, or None where this system has none."""
        if platform.machine() != "x86_64" or _syscall is None:
            return None
        params = _Params()
        try:
            fd = _call(_SETUP, ctypes.c_uint(depth), ctypes.byref(params))
        except OSError:
            return None
        try:
            return cls(fd, params, depth)
        except OSError:
            os.close(fd)
            return None

    def _buffer_index(self, address: int, length: int) -> int | None:
        """The table index of the registered buffer holding ``[address, address + length)``,
        registering the `BUFFERS` entry that holds it on first use; None where none does."""
        for index, (start, size) in enumerate(self._registered):
            if start <= address and address + length <= start + size:
                return index
        at = bisect.bisect_right(BUFFERS, (address, float("inf"))) - 1
        if (at < 0 or address + length > sum(BUFFERS[at]) or BUFFERS[at] in self._refused
                or len(self._registered) == _TABLE):
            return None
        vector = _Iovec(BUFFERS[at][0], BUFFERS[at][1])
        update = _RsrcUpdate(offset=len(self._registered), data=ctypes.addressof(vector), nr=1)
        try:
            _call(_REGISTER, ctypes.c_uint(self._fd), ctypes.c_uint(_BUFFERS_UPDATE), ctypes.byref(update),
                  ctypes.c_uint(ctypes.sizeof(update)))
        except OSError:  # memory the kernel will not pin for long (as some drivers' mappings)
            self._refused.add(BUFFERS[at])
            COUNTS["uring_refused_buffers"] = len(self._refused)
            return None
        self._registered.append(BUFFERS[at])
        COUNTS["uring_registered_buffers"] = len(self._registered)
        return len(self._registered) - 1

    def submit(self, slot: int, fd: int, address: int, length: int, offset: int) -> None:
        """Start reading ``length`` bytes at ``offset`` of ``fd`` into ``address`` (from a
        registered buffer where one holds it); ``slot`` is free again once `reap` returned it."""
        index = self._buffer_index(address, length)
        tail = self._sq_tail.value
        entry = tail & self._sq_mask
        self._sqe_entries[entry] = _Sqe(opcode=_READ if index is None else _READ_FIXED, fd=fd, off=offset,
                                        addr=address, len=length, user_data=slot, buf_index=index or 0)
        self._sq_array[entry] = entry
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF
        _call(_ENTER, ctypes.c_uint(self._fd), ctypes.c_uint(1), ctypes.c_uint(0), ctypes.c_uint(0), None,
              ctypes.c_size_t(0))
        self._in_flight += 1

    def reap(self, at_least: int) -> list[tuple[int, int]]:
        """Wait until ``at_least`` reads have ended; ``(slot, bytes read or -errno)`` of each
        that has."""
        if (self._cq_tail.value - self._cq_head.value) & 0xFFFFFFFF < at_least:
            _call(_ENTER, ctypes.c_uint(self._fd), ctypes.c_uint(0), ctypes.c_uint(at_least),
                  ctypes.c_uint(_GETEVENTS), None, ctypes.c_size_t(0))
        head, tail, ended = self._cq_head.value, self._cq_tail.value, []
        while head != tail:
            cqe = self._cqes[head & self._cq_mask]
            ended.append((cqe.user_data, cqe.res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        self._in_flight -= len(ended)
        return ended

    def close(self) -> None:
        """Wait for reads in flight (their buffers may go once this returns), then free the ring."""
        if self._fd < 0:
            return
        while self._in_flight:
            self.reap(self._in_flight)
        for view in ("_sq_tail", "_sq_array", "_cq_head", "_cq_tail", "_cqes", "_sqe_entries"):
            delattr(self, view)
        self._ring.close()
        self._sqes.close()
        os.close(self._fd)
        self._fd = -1


def _submit_costs(path: str, reads: int = 400) -> None:
    """Median microseconds of one submit of an O_DIRECT read (4 KiB and 512 KiB) at random
    offsets of ``path``: kernel AIO, io_uring into a plain buffer, io_uring into a registered
    one. Three runs, the ways in turn."""
    import random
    import statistics
    import time

    from distsave.saving.kernel_aio import KernelReads

    largest, size = 512 * 1024, os.path.getsize(path)
    memory = mmap.mmap(-1, largest)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    ways = {"kernel AIO": KernelReads.open(1), "io_uring": UringReads.open(1),
            "io_uring, registered": UringReads.open(1)}
    try:
        for run in range(3):
            costs = {}
            for block in (4096, largest):
                for name, queue in ways.items():
                    BUFFERS[:] = [(address, largest)] if "registered" in name else []
                    times = []
                    for _ in range(reads):
                        offset = random.randrange(size // block) * block
                        start = time.perf_counter()
                        queue.submit(0, fd, address, block, offset)
                        times.append(time.perf_counter() - start)
                        assert queue.reap(1)[0][1] == block
                    costs[f"{name}, {block // 1024} KiB"] = round(statistics.median(times) * 1e6, 1)
            print(f"run {run}: µs per submit {costs}")
        assert ways["io_uring, registered"]._registered and not ways["io_uring"]._registered
    finally:
        for queue in ways.values():
            queue.close()
        os.close(fd)


if __name__ == "__main__":
    import sys

    _submit_costs(sys.argv[1] if len(sys.argv) > 1 else "/work/probe/big.bin")
