"""Tensors in safetensors files, with Hugging Face shard naming and index when sharded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError

__all__ = ["read_tensors", "write_tensors"]


def _logical(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)  # a DTensor: files hold the whole tensor
    tensor = full() if callable(full) else tensor
    return tensor.detach().to("cpu", copy=True).contiguous()


def write_tensors(directory: Path, stem: str, tensors: dict[str, torch.Tensor],
                  max_shard_size: int | None = None) -> list[str]:
    """Write ``{stem}.safetensors``, or ``{stem}-0000i-of-0000n.safetensors`` plus an index."""
    tensors = {name: _logical(t) for name, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / f"{stem}.safetensors", metadata={"format": "pt"})
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, f"{stem}.safetensors.index.json"]


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ArtifactError(f"{file.name} is not a readable safetensors file: {error}.") from None


def read_tensors(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    """Read what `write_tensors` wrote (single file or shards), onto the CPU."""
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return _load(single)
    index_file = directory / f"{stem}.safetensors.index.json"
    if not index_file.is_file():
        raise ArtifactError(f"Neither {single.name} nor {index_file.name} is in '{directory}'.")
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{index_file.name} is not a valid shard index: {error!r}.") from None
    expected_shards = {f for f in weight_map.values()
                       if isinstance(f, str) and f.startswith(f"{stem}-") and "/" not in f}
    if len(expected_shards) != len(set(weight_map.values())):
        raise ArtifactError(f"{index_file.name} names shard files outside this artifact's naming.")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(expected_shards):
        tensors.update(_load(directory / shard))
    if set(tensors) != set(weight_map):
        raise ArtifactError(f"{index_file.name} does not match its shards' tensors.")
    return tensors

