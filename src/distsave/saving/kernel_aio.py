"""Linux kernel asynchronous reads (``io_submit``/``io_getevents``), called through ctypes.

One thread keeps a fixed number of ``O_DIRECT`` reads in flight without a thread per read: it
only reaps and resubmits, so no read waits for a busy reading thread to get the interpreter
back. On the device machine's disk, Python threads reading 512 KiB blocks had 9-30 requests in
flight where fastsafetensors' C++ threads keep 16; this queue keeps 16 (15.0 on the disk against
fastsafetensors' 15.8; benchmarks/RESULTS.md, tenth round). The system calls are made directly
(no libaio, no compiled extension); where the kernel or a sandbox refuses them,
`KernelReads.open` returns None and callers read with threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from .. import _libc

__all__ = ["KernelReads"]

# (io_setup, io_destroy, io_getevents, io_submit) in the kernel's system call tables
_CALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}.get(platform.machine())
_PREAD = 0  # IOCB_CMD_PREAD
_syscall = _libc.function("syscall", [ctypes.c_long])


class _Iocb(ctypes.Structure):
    """``struct iocb`` of <linux/aio_abi.h> (64-bit, little-endian)."""

    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    """``struct io_event``: which request ended (``data``) and its result (bytes, or -errno)."""

    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class KernelReads:
    """Up to ``depth`` reads in flight at once; each is named by a slot number below ``depth``."""

    def __init__(self, context: ctypes.c_ulong, depth: int):
        self._context, self.depth = context, depth
        self._requests = (_Iocb * depth)()
        self._pointers = (ctypes.POINTER(_Iocb) * depth)(*(ctypes.pointer(r) for r in self._requests))
        self._events = (_Event * depth)()

    @classmethod
    def open(cls, depth: int) -> KernelReads | None:
        """A context for ``depth`` reads in flight, or None where this system has none."""
        if _CALLS is None or _syscall is None:
            return None
        context = ctypes.c_ulong(0)
        if _syscall(ctypes.c_long(_CALLS[0]), ctypes.c_uint(depth), ctypes.byref(context)) != 0:
            return None  # ENOSYS, EPERM (a sandbox), EAGAIN (fs.aio-max-nr reached)
        return cls(context, depth)

    def submit(self, slot: int, fd: int, address: int, length: int, offset: int) -> None:
        """Start reading ``length`` bytes at ``offset`` of ``fd`` into ``address``; ``slot`` is
        free again once `reap` has returned it.

        One read per call: reads submitted together are merged by the block layer into requests
        of up to ``max_sectors_kb`` (4 MiB on the device machine), and that disk served a few
        large requests in flight slower than 16 of 512 KiB (benchmarks/RESULTS.md, tenth round)."""
        request = self._requests[slot]
        request.data, request.opcode, request.fildes = slot, _PREAD, fd
        request.buf, request.nbytes, request.offset = address, length, offset
        pointer = ctypes.byref(self._pointers, slot * ctypes.sizeof(ctypes.c_void_p))
        while _syscall(ctypes.c_long(_CALLS[3]), self._context, ctypes.c_long(1), pointer) != 1:
            code = ctypes.get_errno()
            if code not in (errno.EINTR, errno.EAGAIN):
                raise OSError(code, f"io_submit: {os.strerror(code)}")

    def reap(self, at_least: int) -> list[tuple[int, int]]:
        """Wait until ``at_least`` reads have ended; ``(slot, bytes read or -errno)`` of each
        that has."""
        while True:
            got = _syscall(ctypes.c_long(_CALLS[2]), self._context, ctypes.c_long(at_least),
                           ctypes.c_long(self.depth), self._events, None)
            if got >= 0:
                return [(self._events[i].data, self._events[i].res) for i in range(got)]
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_getevents: {os.strerror(code)}")

    def close(self) -> None:
        """Wait for reads in flight and free the context (the kernel waits in io_destroy)."""
        if self._context.value:
            _syscall(ctypes.c_long(_CALLS[1]), self._context)
            self._context = ctypes.c_ulong(0)
