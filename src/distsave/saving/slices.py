"""Which bytes of a stored (logical) tensor this process holds.

Files always store whole, logical tensors. A process of a sharded model holds rows of some of
them (a DTensor sharded on dim 0, as `ShardedStrategy` places parameters and their optimizer
state); every other tensor it holds whole. Writers and readers both work from this.
"""

from __future__ import annotations

import math
import sys

import torch

from .errors import SaveError

__all__ = ["is_dtensor", "local_slice"]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, without importing DTensor (a second of a cold start):
    where it was never imported, nothing is one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_slice(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``(local tensor, first byte, replicated)``: the tensor this process holds (the same
    memory, not a copy), where its bytes start in the stored tensor's bytes, and whether every
    process holds it whole.

    Raises:
        SaveError: a DTensor placed other than ``Shard(0)`` or ``Replicate`` on a 1-D mesh.
    """
    if not is_dtensor(tensor):
        return tensor.detach(), 0, True
    placements = tensor.placements
    local = tensor.to_local().detach()
    if all(p.is_replicate() for p in placements):
        return local, 0, True
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise SaveError(f"Tensor {name!r} is a DTensor placed as {placements}; distsave stores rows "
                        "sharded on one mesh dimension (Shard(0), as ShardedStrategy places them) or "
                        "replicated tensors. Redistribute it first.")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)
    row_bytes = math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
    return local, offset[0] * row_bytes, False
