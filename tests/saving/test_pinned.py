"""Staging memory for GPU copies sits on transparent huge pages (its registration with CUDA is
tested in tests/gpu)."""

from pathlib import Path

import pytest

from distsave.saving.pinned import HUGE_PAGE_BYTES, huge_page_memory

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="the kernel gives no transparent huge pages")
def test_staging_memory_starts_on_a_huge_page_and_is_backed_by_them():
    """O_DIRECT reads pin their buffer's pages once per read: on 2 MiB pages there are 512
    times fewer of them. The buffer must start on a huge-page boundary and be faulted in as
    huge pages (advised, not left to the kernel's default)."""
    size = 4 * HUGE_PAGE_BYTES + 4096  # as a chunk's span: not a whole number of huge pages
    before = _anon_huge_kib()
    buffer = huge_page_memory(size)
    assert buffer.numel() == size and buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    assert _anon_huge_kib() - before >= 4 * HUGE_PAGE_BYTES // 1024
    buffer[-1] = 7
    assert int(buffer[:-1].count_nonzero()) == 0 and int(buffer[-1]) == 7
