"""Page-locked host buffers for the device <-> host copies of saves and loads, on transparent
huge pages.

A GPU load reads with ``O_DIRECT`` into these buffers, and the kernel pins the pages of the
buffer for every read it is given: 128 pages for a 512 KiB read on 4 KiB pages, one on a 2 MiB
page. ``torch.empty(pin_memory=True)`` gives 4 KiB pages. So the buffers here are anonymous
memory on a 2 MiB boundary that the kernel is asked to back with huge pages
(``MADV_HUGEPAGE``), then registered with CUDA (``cudaHostRegister``). With them a cold GPU
load of 6.44 GB took 7% less time (benchmarks/RESULTS.md, thirteenth round). Where the kernel
gives no huge pages the same buffers are plain pages, pinned the same way; on systems without
``MADV_HUGEPAGE`` (not Linux) they come from ``pin_memory``.

A save's buffered writes pin nothing, so a save stages through ``pin_memory`` buffers, which
torch keeps from one save to the next instead of registering new ones each time.
"""

from __future__ import annotations

import mmap
import threading

import torch

__all__ = ["HUGE_PAGE_BYTES", "PinnedPool", "huge_page_memory"]

HUGE_PAGE_BYTES = 2 << 20


def huge_page_memory(size: int) -> torch.Tensor:
    """``size`` bytes of private anonymous memory starting on a huge-page boundary, advised
    ``MADV_HUGEPAGE`` and touched, so its pages are in place before CUDA pins them. The memory
    goes back once the tensor and every view of it are gone."""
    region = mmap.mmap(-1, size + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    buffer = whole[(-whole.data_ptr()) % HUGE_PAGE_BYTES:][:size]
    buffer.fill_(0)
    return buffer


class PinnedPool:
    """Reusable page-locked buffers of ``size`` bytes, each with its own CUDA stream, for
    device <-> host copies that several threads run at once: on huge pages and registered with
    CUDA where ``huge_pages`` (for ``O_DIRECT`` reads), else from ``pin_memory``. `close` waits
    for each registered buffer's copies and unregisters it."""

    def __init__(self, device: torch.device, size: int, huge_pages: bool):
        self.device, self.size, self.huge_pages = device, size, huge_pages
        self._free: list[tuple[torch.Tensor, torch.cuda.Stream]] = []
        self._registered: list[tuple[torch.Tensor, torch.cuda.Stream]] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[torch.Tensor, torch.cuda.Stream]:
        with self._lock:
            if self._free:
                return self._free.pop()
        stream = torch.cuda.Stream(self.device)
        if not (self.huge_pages and hasattr(mmap, "MADV_HUGEPAGE")):
            return torch.empty(self.size, dtype=torch.uint8, pin_memory=True), stream
        buffer = huge_page_memory(self.size)
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), self.size, 0))
        with self._lock:
            self._registered.append((buffer, stream))
        return buffer, stream

    def give(self, staging: tuple[torch.Tensor, torch.cuda.Stream]) -> None:
        with self._lock:
            self._free.append(staging)

    def close(self) -> None:
        """Wait for the copies queued on each registered buffer, then unregister it (an error
        mid-load may leave copies queued)."""
        with self._lock:
            registered, self._registered, self._free = self._registered, [], []
        for buffer, stream in registered:
            stream.synchronize()
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
