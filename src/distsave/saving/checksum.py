"""File checksums: which algorithm a format version uses, and its digests' shape.

Checksums guard integrity (a flipped bit, a torn or truncated write, a file from another
save), not authenticity: whoever can write an artifact can recompute them, so loaders treat
contents as hostile whatever they say (DESIGN.md §3). Format version 4 uses XXH3-128: about 8
GiB/s on one core against sha256's 1.3 (with SHA-NI), so checking every byte while it is read
or written never limits a save or load, even on a 2-core machine; 128 bits make an accidental
match of a damaged 16 MiB chunk impossible in practice. Versions 1-3 used sha256 and are read
as written. The manifest's own checksum stays sha256 (a few kB).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import xxhash

__all__ = ["Checksum", "Digest", "SHA256", "WRITTEN", "XXH3_128", "for_version"]


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class Checksum:
    """A checksum algorithm by the manifest field that lists its digests (one per chunk)."""

    field: str
    new: Callable[[], Digest]
    hex_length: int

    def of(self, data: bytes | memoryview) -> str:
        digest = self.new()
        digest.update(data)
        return digest.hexdigest()

    def is_digest(self, value: object) -> bool:
        return isinstance(value, str) and bool(re.fullmatch(f"[0-9a-f]{{{self.hex_length}}}", value))


SHA256 = Checksum("sha256", hashlib.sha256, 64)
XXH3_128 = Checksum("xxh3_128", xxhash.xxh3_128, 32)
WRITTEN = XXH3_128  # what this version of distsave writes


def for_version(version: int) -> Checksum:
    """The checksum of every file listed in a manifest of this format version."""
    return SHA256 if version < 4 else XXH3_128
