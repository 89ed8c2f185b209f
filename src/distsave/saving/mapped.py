"""CPU loads without a copy: tensors backed by a private mapping of their checked file.

A private mapping (what ``safetensors.load_file`` and ``torch.load(mmap=True)`` use) hands out
the page cache's own pages: nothing is zero-filled or copied, and processes loading the same
artifact share one copy of its weights until one of them writes (copy-on-write: the file never
changes). Every chunk is still hashed, through the mapping, before any tensor is handed out;
the header's bytes are hashed as they were parsed. A tensor whose bytes do not start on a
64-byte boundary (files of other writers, small tensors of odd sizes) is copied into fresh
memory, aligned as torch's allocator aligns it: BLAS may sum in another order at another
alignment, and a loaded model must predict exactly as the saved one.

The price, as for every mmap loader: the files must not be rewritten in place while the
tensors live. distsave never does (a save replaces the whole directory, and the mapping keeps
the old file); a file cut short under a live mapping ends the process with SIGBUS. Load with
``mmap=False`` where other tools may overwrite the artifact's files in place.
"""

from __future__ import annotations

import mmap

import torch

from .checksum import Checksum
from .errors import ArtifactError
from .format import TENSOR_ALIGNMENT
from .tensor_io import TensorFile, failed_chunks, in_turn, run_parallel

__all__ = ["map_files"]


def map_files(files: list[tuple[TensorFile, list[str], list[int]]],
              checksum: Checksum) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
    """Map each ``(file, digests, chunk starts)`` and check every chunk, all files' chunks on
    one pool of threads.

    Returns:
        For each file: its tensors by name (empty when a chunk failed) and the indices of the
        chunks whose ``checksum`` differs from the digests.
    """
    maps = [_map(file) for file, _, _ in files]
    for mapping in maps:
        if hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_WILLNEED)  # start reading ahead of the hashing threads
    jobs = in_turn([[(index, chunk) for chunk in range(len(starts))] for index, (_, _, starts) in enumerate(files)])

    def check_chunk(job: tuple[int, int]) -> bool:
        index, chunk = job
        file, digests, starts = files[index]
        start = starts[chunk]
        end = starts[chunk + 1] if chunk + 1 < len(starts) else file.size
        digest = checksum.new()
        header = len(file.header)
        if start < header:
            digest.update(file.header[start:min(end, header)])
        digest.update(memoryview(maps[index])[max(start, header):end])
        return chunk < len(digests) and digest.hexdigest() == digests[chunk]

    bad = failed_chunks(len(files), jobs, run_parallel(check_chunk, jobs))
    return [({} if failed else _tensors(file, mapping), failed)
            for (file, _, _), mapping, failed in zip(files, maps, bad)]


def _map(file: TensorFile) -> mmap.mmap:
    try:
        return mmap.mmap(file.fd, file.size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as error:  # ValueError: the file is shorter than when opened
        raise ArtifactError(f"{file.name} changed while it was read ({error}). Load again once no one "
                            "writes the artifact.") from None


def _tensors(file: TensorFile, mapping: mmap.mmap) -> dict[str, torch.Tensor]:
    """Each entry of ``file`` as a tensor on ``mapping`` (kept alive by the tensors), or copied
    where its bytes are not aligned."""
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    tensors = {}
    for name, entry in file.entries.items():
        if not entry.nbytes:
            tensors[name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        raw = data[entry.start:entry.start + entry.nbytes]
        if entry.start % TENSOR_ALIGNMENT:
            raw = raw.clone()
        tensors[name] = raw.view(entry.dtype).view(entry.shape)
    return tensors
