"""Writing an artifact's files and its manifest, and reading the manifest back.

`ArtifactWriter` writes every file of an artifact into a staging folder and records each
file's size and checksums from the bytes it wrote (nothing is read back); `finish` writes
``manifest.json`` last. `read_manifest` is the public check of an artifact on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch

from .errors import SaveError
from .format import (DEFAULT_MAX_SHARD_BYTES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, index_file,
                     shard_file, single_file)
from .snapshot import Snapshot, canonical_manifest_bytes
from .tensor_io import FileRecord, chunk_digests, layout, write_safetensors

__all__ = ["ArtifactWriter", "FilePlan", "plan_stem", "read_manifest", "seal_manifest"]


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"distsave": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class FilePlan:
    """One safetensors file to write: its name, header bytes, each tensor's absolute offset, size."""

    name: str
    header: bytes
    offsets: dict[str, int]
    size: int


def plan_stem(stem: str, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
              max_shard_bytes: int | None) -> tuple[list[FilePlan], dict[str, Any] | None]:
    """The files of ``stem`` for tensors of these dtypes and global shapes: one file, or shards
    of at most ``max_shard_bytes`` (default 4 GiB) with their Hugging Face index content."""
    limit = DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if limit <= 0:
        raise SaveError(f"Expected max_shard_size > 0 bytes. Received: {max_shard_bytes}.")
    groups: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = [{}]
    size = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][name] = (dtype, shape)
        size += nbytes
    names = ([single_file(stem)] if len(groups) == 1
             else [shard_file(stem, i, len(groups)) for i in range(len(groups))])
    files = []
    for name, group in zip(names, groups):
        header, offsets = layout(group)
        data = sum(math.prod(shape) * dtype.itemsize for dtype, shape in group.values())
        files.append(FilePlan(name, header, offsets, len(header) + data))
    if len(files) == 1:
        return files, None
    total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in tensors.values())
    weight_map = {key: file.name for file in files for key in file.offsets}
    return files, {"metadata": {"total_size": total}, "weight_map": weight_map}


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Set ``manifest_sha256`` over the rest of the manifest."""
    manifest["manifest_sha256"] = hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()
    return manifest


class ArtifactWriter:
    """Writes an artifact's files into ``staging`` and lists each with its checksums."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.files: dict[str, FileRecord] = {}

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.staging / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = chunk_digests(data)

    def write_json(self, name: str, content: Any) -> None:
        self.write_bytes(name, json.dumps(content, separators=(",", ":")).encode())

    def write_tensors(self, stem: str, tensors: dict[str, torch.Tensor],
                      max_shard_bytes: int | None = None) -> list[str]:
        """``{stem}.safetensors``, or Hugging Face shards ``{stem}-0000i-of-0000n.safetensors``
        of at most ``max_shard_bytes`` each plus ``{stem}.safetensors.index.json``."""
        return self.write_tensor_sets({stem: tensors}, max_shard_bytes)

    def write_index(self, stem: str, index: dict[str, Any] | None) -> list[str]:
        """The Hugging Face shard index of ``stem``, if it has shards."""
        if index is None:
            return []
        self.write_json(index_file(stem), index)
        return [index_file(stem)]

    def write_tensor_sets(self, sets: dict[str, dict[str, torch.Tensor]],
                          max_shard_bytes: int | None = None) -> list[str]:
        """The files of several stems (weights, optimizer state; see `write_tensors`), all
        written and flushed to disk at once; the names written."""
        planned = {stem: plan_stem(stem, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()},
                                   max_shard_bytes) for stem, tensors in sets.items()}
        files = [(file.name, {name: sets[stem][name] for name in file.offsets})
                 for stem, (stem_files, _) in planned.items() for file in stem_files]
        records = write_safetensors({self.staging / name: tensors for name, tensors in files})
        self.files.update((name, record) for (name, _), record in zip(files, records))
        return [name for name, _ in files] + [written for stem, (_, index) in planned.items()
                                              for written in self.write_index(stem, index)]

    def finish(self, content: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` (format, versions, ``content``, every file's checksums)."""
        manifest = seal_manifest({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                  "written_by": _versions(), **content,
                                  "files": {name: record.to_json() for name, record in sorted(self.files.items())}})
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        del self.files[MANIFEST]
        return manifest


def read_manifest(path: str | os.PathLike, *, verify_checksums: bool = True) -> dict[str, Any]:
    """Validate the artifact at ``path`` and return its manifest.

    Checks the manifest's schema and checksum, that every listed file is there (a regular file
    of the listed size) and nothing else is, and, with ``verify_checksums``, every file's bytes.

    Raises:
        ArtifactError: naming each file that is missing, extra, resized, altered or unsafe.
    """
    with Snapshot.open(path) as snapshot:
        if verify_checksums:
            snapshot.verify_remaining()
        return snapshot.manifest
