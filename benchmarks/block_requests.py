"""The shape of the requests a disk served while something ran: how many, how large, how many
at once, from the block device's counters (/sys/class/block/<dev>/stat, sampled every 5 ms).

Two loaders can read the same bytes at the same rate from a program's view and still ask the
disk very differently: fastsafetensors' 16 threads of 512 KiB blocks reached a virtual disk as
~16 requests of 512 KiB in flight, while 16 threads of 16 MiB reads reached it as 4 MiB requests,
~64 in flight, each waiting ~130 ms in the host's queue (benchmarks/RESULTS.md, eighth and ninth
rounds).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

SECTOR_BYTES = 512  # the unit of the stat file's sector counts, whatever the disk's own sector
_READS, _READ_SECTORS, _WRITES, _WRITE_SECTORS, _IN_FLIGHT = 0, 2, 4, 6, 8


def stat_file(source: str) -> Path | None:
    """The counters of the block device ``source`` (a mount's source, e.g. /dev/vda1); None
    where it is no block device (tmpfs, overlay, a network file system)."""
    if not source.startswith("/dev/"):
        return None
    path = Path("/sys/class/block") / Path(os.path.realpath(source)).name / "stat"
    return path if path.exists() else None


class RequestSampler:
    """Samples a block device's counters from `start` to `stop`, in a thread."""

    def __init__(self, stat: Path, interval_s: float = 0.005):
        self.stat, self.interval_s = stat, interval_s
        self._samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> list[int]:
        return [int(field) for field in self.stat.read_text().split()]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._read())
            time.sleep(self.interval_s)

    def start(self) -> RequestSampler:
        self._samples.append(self._read())
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Requests served meanwhile: reads and writes, their mean size in KiB, and the mean
        number in flight over the samples where any was (reads and writes together, as the
        device counts them)."""
        self._stop.set()
        self._thread.join()
        self._samples.append(self._read())
        first, last = self._samples[0], self._samples[-1]
        busy = [s[_IN_FLIGHT] for s in self._samples if s[_IN_FLIGHT]]

        def shape(count: int, sectors: int) -> dict[str, float]:
            requests = last[count] - first[count]
            size = (last[sectors] - first[sectors]) * SECTOR_BYTES
            return {"requests": requests, "mean_kib": round(size / requests / 1024, 1) if requests else 0.0}

        return {"reads": shape(_READS, _READ_SECTORS), "writes": shape(_WRITES, _WRITE_SECTORS),
                "mean_in_flight": round(sum(busy) / len(busy), 1) if busy else 0.0}


def _served_by(op: str) -> str:
    """Which requests a step is about: a load's reads, a save's writes."""
    return "reads" if op == "load" else "writes"


def typical(shapes: list[dict[str, Any]], op: str) -> str:
    """The median request size and depth over several runs of one step, for a table's notes."""
    kind = _served_by(op)
    size = statistics.median(s[kind]["mean_kib"] for s in shapes)
    depth = statistics.median(s["mean_in_flight"] for s in shapes)
    return f"{op}: {size:.0f} KiB {kind}, {depth:.1f} in flight (medians of {len(shapes)})"


def describe(shape: dict[str, Any], op: str) -> str:
    """One step's requests, e.g. "12344 reads of 512 KiB, 15.8 in flight"."""
    kind = _served_by(op)
    served = shape[kind]
    return f"{served['requests']} {kind} of {served['mean_kib']:.0f} KiB, {shape['mean_in_flight']} in flight"
