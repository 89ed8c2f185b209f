"""Raw benchmark logs: one JSON line per measurement, with what is needed to reproduce it
(commit, card, versions, date), under ``benchmarks/results/``. RESULTS.md cites medians of
these lines, never a number that has no line here."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Commit (with a dirty flag), card, versions and date of this run."""
    import distsave

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--", "src")),
            "card": card, "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
            "torch": torch.__version__, "distsave": distsave.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class RawLog:
    """Append measurements to ``results/<benchmark>-<date>-<commit>.jsonl``."""

    def __init__(self, benchmark: str, device: torch.device, folder: Path = RESULTS):
        self.context = {"benchmark": benchmark, **environment(device)}
        folder.mkdir(parents=True, exist_ok=True)
        stamp = self.context["date"][:19].replace(":", "")
        self.path = folder / f"{benchmark}-{stamp}-{self.context['commit'][:10]}.jsonl"
        self.records: list[dict[str, Any]] = []

    def write(self, **record: Any) -> None:
        line = {**self.context, **record}
        self.records.append(line)
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def medians(self, key: tuple[str, ...], value: str) -> dict[tuple, tuple[float, int]]:
        """Median of ``value`` and the run count for each distinct ``key`` of the records."""
        groups: dict[tuple, list[float]] = defaultdict(list)
        for record in self.records:
            if record.get(value) is not None:
                groups[tuple(record[k] for k in key)].append(record[value])
        return {k: (statistics.median(v), len(v)) for k, v in groups.items()}
