"""`ServeConfig`: what `distsave serve` serves, where, and how it batches."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ServeConfig"]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Settings of one model server.

    Args:
        path: An artifact directory (served as version 1), a folder of numbered version
            folders (``1/``, ``2/``, …: the highest is served, new ones are picked up), or an
            fsspec URL of either kind.
        name: The model name in URLs (``/v1/models/<name>``).
        host: Interface to bind; localhost by default, so nothing is exposed unless asked.
        port: TCP port; 0 picks a free one (the server prints the one it bound).
        device: Where signatures run (``cpu``, ``cuda:0``).
        max_batch_size: Dynamic batching: run up to this many rows as one batch (0: off).
        batch_timeout_ms: Dynamic batching: wait at most this long for more requests.
        max_body_bytes: Requests with a larger body are refused with 400.
        poll_seconds: How often a version folder is checked for a new version (0: never).
    """

    path: str
    name: str = "default"
    host: str = "127.0.0.1"
    port: int = 8501
    device: str = "cpu"
    max_batch_size: int = 0
    batch_timeout_ms: float = 2.0
    max_body_bytes: int = 64 * 2**20
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not _MODEL_NAME.match(self.name):
            problems.append(f"name={self.name!r}: use letters, digits, '_', '-' or '.'")
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port}: expected 0..65535")
        if self.max_batch_size < 0:
            problems.append(f"max_batch_size={self.max_batch_size}: expected 0 (off) or more")
        if self.batch_timeout_ms < 0:
            problems.append(f"batch_timeout_ms={self.batch_timeout_ms}: expected 0 or more")
        if self.max_body_bytes < 1:
            problems.append(f"max_body_bytes={self.max_body_bytes}: expected a positive size")
        if self.poll_seconds < 0:
            problems.append(f"poll_seconds={self.poll_seconds}: expected 0 (never) or more")
        if problems:
            raise ValueError("Invalid serving settings: " + "; ".join(problems) + ".")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1
