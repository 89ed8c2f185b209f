"""Several processes write one artifact's tensor files together, each the bytes it holds.

A sharded tensor's rows are written by the process that owns them; of a tensor every process
holds whole (replicated), each process writes an equal, contiguous share of each file's
`HASH_CHUNK_BYTES` chunks. No process gathers a tensor. Every process computes the same file
plan from its tensors' names, dtypes and global shapes (`plan_sets`; its `fingerprint` shows
that they agree), writes and hashes its own segments (`write_held`), and the chief turns every
process's segments into the manifest's records (`merge_records`). When each process wrote whole
grid chunks (the replicated case) the files and records equal a single writer's, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SaveError
from .format import HASH_CHUNK_BYTES
from .manifest import FilePlan, plan_stem
from .slices import local_slice
from .tensor_io import FileRecord, Piece, flat_bytes, reserve, run_parallel, write_pieces

__all__ = ["HeldBytes", "Plan", "create_files", "held_bytes", "merge_records", "plan_sets", "write_held"]


@dataclass(frozen=True)
class HeldBytes:
    """What this process holds of one stored tensor: ``data`` (flat bytes) from byte ``first``
    of the tensor's stored bytes; a replicated tensor is held whole by every process."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor
    first: int
    replicated: bool


def held_bytes(name: str, tensor: torch.Tensor) -> HeldBytes:
    """This process's part of ``tensor`` (see `local_slice`), as contiguous flat bytes."""
    local, first, replicated = local_slice(name, tensor)
    local = local.contiguous()
    return HeldBytes(local.dtype, tuple(tensor.shape), flat_bytes(local), first, replicated)


@dataclass(frozen=True)
class Plan:
    """Every file of every stem, and the shard indexes (stem -> content) to write as JSON."""

    files: list[FilePlan]
    indexes: dict[str, dict[str, Any]]

    def fingerprint(self) -> str:
        """A digest of every file's name and header: equal on processes that agree."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.name.encode() + b"\0" + file.header)
        return digest.hexdigest()


def plan_sets(held: dict[str, dict[str, HeldBytes]], max_shard_bytes: int | None) -> Plan:
    """The files of each stem (``stem -> name -> held bytes``), from global dtypes and shapes."""
    files, indexes = [], {}
    for stem, tensors in held.items():
        stem_files, index = plan_stem(stem, {n: (h.dtype, h.shape) for n, h in tensors.items()}, max_shard_bytes)
        files += stem_files
        if index is not None:
            indexes[stem] = index
    return Plan(files, indexes)


def create_files(staging: Path, plan: Plan) -> None:
    """Create every planned file at its final size (the chief, before anyone writes)."""
    for file in plan.files:
        fd = os.open(staging / file.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            reserve(fd, file.size)
        finally:
            os.close(fd)


def _pieces(file: FilePlan, held: dict[str, HeldBytes], rank: int, world: int) -> list[Piece]:
    """The bytes of ``file`` that process ``rank`` writes, in file order."""
    chunks = -(-file.size // HASH_CHUNK_BYTES)

    def owner(offset: int) -> int:
        return (offset // HASH_CHUNK_BYTES) * world // chunks

    pieces = [Piece(0, len(file.header), file.header, 0)] if owner(0) == rank else []
    for name, start in sorted(file.offsets.items(), key=lambda item: item[1]):
        part = held[name]
        length = part.data.numel()
        if not part.replicated:
            if length:
                pieces.append(Piece(start + part.first, length, part.data, 0))
            continue
        offset = start
        while offset < start + length:
            end = min(start + length, (offset // HASH_CHUNK_BYTES + 1) * HASH_CHUNK_BYTES)
            if owner(offset) == rank:
                pieces.append(Piece(offset, end - offset, part.data, offset - start))
            offset = end
    return pieces


def write_held(staging: Path, plan: Plan, held: dict[str, dict[str, HeldBytes]],
               rank: int, world: int) -> dict[str, list[list[Any]]]:
    """Write this process's bytes of every planned file (created by the chief) and flush them.

    Returns:
        ``file name -> [[start, length, digest], ...]``, the segments written (JSON-able).
    """
    everything = {name: part for tensors in held.values() for name, part in tensors.items()}
    files = [(file, _pieces(file, everything, rank, world)) for file in plan.files]
    fds = []
    try:
        for file, _ in files:
            fds.append(os.open(staging / file.name, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)))
        written = write_pieces([(fd, pieces) for fd, (_, pieces) in zip(fds, files)])
        run_parallel(os.fsync, fds, workers=len(fds))
    finally:
        for fd in fds:
            os.close(fd)
    return {file.name: [[s.start, s.length, s.digest] for s in segments]
            for (file, _), segments in zip(files, written)}


def merge_records(plan: Plan, reports: list[dict[str, list[list[Any]]]]) -> dict[str, FileRecord]:
    """Each file's record from every process's segments, which must tile the file exactly.

    Raises:
        SaveError: a byte range no process wrote, or two processes wrote (their tensors'
            shardings disagree).
    """
    records = {}
    for file in plan.files:
        segments = sorted((start, length, digest, rank) for rank, report in enumerate(reports)
                          for start, length, digest in report.get(file.name, []))
        position = 0
        for start, length, _, rank in segments:
            if start != position:
                what = "no process wrote" if start > position else f"replica {rank} wrote again"
                raise SaveError(f"{file.name}: bytes {min(start, position)}-{max(start, position)} {what}; "
                                "the replicas' shardings of the model disagree. Nothing was saved.")
            position = start + length
        if position != file.size:
            raise SaveError(f"{file.name}: bytes {position}-{file.size} no process wrote; the replicas' "
                            "shardings of the model disagree. Nothing was saved.")
        starts = [s[0] for s in segments]
        grid = starts == list(range(0, file.size, HASH_CHUNK_BYTES))
        records[file.name] = FileRecord(file.size, [s[2] for s in segments], None if grid else starts)
    return records
