"""The strategy protocol: where replicas live and how they talk, behind one small interface.

A strategy owns devices and processes. Each replica is one process (or the only one), so a
`Strategy` object describes *this* replica: its device, its rank, and collectives with its
peers. Models and datasets ask the strategy in scope; they never call `torch.distributed`.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..data import seeds
from ..data.dataset import Dataset

__all__ = ["DistributedDataset", "ReduceOp", "Strategy", "get_strategy", "has_strategy"]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReduceOp(str, enum.Enum):
    SUM = "SUM"
    MEAN = "MEAN"


_scope_stack: list[Strategy] = []
_default: Strategy | None = None


def get_strategy() -> Strategy:
    """The strategy whose ``scope()`` is active, else the default one-device strategy."""
    global _default
    if _scope_stack:
        return _scope_stack[-1]
    if _default is None:
        from .one_device import OneDeviceStrategy

        _default = OneDeviceStrategy("cuda:0" if torch.cuda.is_available() else "cpu")
    return _default


def has_strategy() -> bool:
    """Whether some strategy's ``scope()`` is active."""
    return bool(_scope_stack)


class Strategy:
    """One replica's view of a distribution strategy. Subclasses fill the ``_`` hooks."""

    device: torch.device
    num_replicas_in_sync: int = 1
    replica_id: int = 0
    forks: bool = False  # a controller that forks its replicas per call (MirroredStrategy, `forked`)

    @property
    def is_chief(self) -> bool:
        """Whether this replica writes files and prints progress."""
        return self.replica_id == 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[Strategy]:
        """Make this the strategy that models built, compiled or loaded inside will use."""
        _scope_stack.append(self)
        try:
            yield self
        finally:
            _scope_stack.pop()

    # -- data ---------------------------------------------------------------------------
    def experimental_distribute_dataset(self, dataset: Dataset) -> DistributedDataset:
        """Split each global batch of ``dataset`` across the replicas (B/N each, as in TF)."""
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Expected a distsave.data.Dataset. Received: {type(dataset).__name__}.")
        return DistributedDataset(dataset, self)

    distribute_dataset = experimental_distribute_dataset

    def shard(self, batch: Any) -> Any:
        """This replica's contiguous part of a global batch, on this replica's device."""
        def local(t: torch.Tensor) -> torch.Tensor:
            if self.num_replicas_in_sync > 1:
                t = torch.tensor_split(t, self.num_replicas_in_sync)[self.replica_id]
            return t.to(self.device, non_blocking=True)
        return pytree.tree_map(local, batch)

    # -- computation --------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run ``fn`` on this replica with its arguments moved to the replica's device."""
        def to_device(value: Any) -> Any:
            return value.to(self.device) if isinstance(value, torch.Tensor) else value

        args = pytree.tree_map(to_device, tuple(args))
        kwargs = pytree.tree_map(to_device, dict(kwargs or {}))
        return fn(*args, **kwargs)

    def reduce(self, reduce_op: ReduceOp | str, value: Any, axis: int | None = None) -> Any:
        """Sum or average ``value`` over replicas (and over ``axis`` first, if given)."""
        op = ReduceOp(str(reduce_op).upper().removeprefix("REDUCEOP."))

        def one(t: torch.Tensor) -> torch.Tensor:
            count = torch.tensor(float(t.shape[axis] if axis is not None else 1), device=t.device)
            total = t.sum(dim=axis) if axis is not None else t.clone()
            total = self._all_reduce_sum(total.to(self.device))
            if op is ReduceOp.MEAN:
                total = total / self._all_reduce_sum(count.to(self.device))
            return total
        return pytree.tree_map(one, value)

    def gather(self, value: Any, axis: int = 0) -> Any:
        """Concatenate every replica's ``value`` along ``axis``; sizes along it may differ."""
        return pytree.tree_map(lambda t: self._all_gather(t.to(self.device), axis), value)

    def barrier(self) -> None:
        """Wait until every replica reaches this point."""

    def broadcast_object(self, obj: Any) -> Any:
        """The chief's ``obj`` on every replica (JSON-able values)."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every replica's JSON-able ``obj``, in replica order (sent as UTF-8 JSON, never pickled)."""
        payload = json.dumps(obj).encode()
        lengths = self._all_gather(torch.tensor([len(payload)], device=self.device), 0).tolist()
        data = self._all_gather(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device), 0)
        data, parts, start = bytes(data.cpu().numpy()), [], 0
        for length in lengths:
            parts.append(json.loads(data[start:start + length]))
            start += length
        return parts

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over replicas (returns a new tensor)."""
        return self._all_reduce_sum(tensor)

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with the chief's values (one collective per dtype).

        A sum where only the chief contributes, over the tensors' bits seen as integers, so every
        dtype (bf16 included) arrives bit for bit whatever the backend supports."""
        if self.num_replicas_in_sync == 1 or self.forks:
            return  # a forking controller is one process: its replicas start from its own weights
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
            wire = flat.view(_BITS[flat.element_size()]) if dtype != torch.bool else flat.to(torch.uint8)
            if not self.is_chief:
                wire = torch.zeros_like(wire)
            summed = self._all_reduce_sum(wire)
            summed = summed.to(torch.bool) if dtype == torch.bool else summed.view(dtype)
            with torch.no_grad():
                for tensor, part in zip(group, summed.split([t.numel() for t in group])):
                    tensor.copy_(part.view_as(tensor))

    def experimental_local_results(self, value: Any) -> tuple[Any, ...]:
        """This process's per-replica values as a tuple (one replica per process: ``(value,)``)."""
        return (value,)

    def call_on_replicas(self, fn: Callable[..., Any], model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run a whole ``fit``/``evaluate``/``predict`` (``fn(model, ...)``) as every replica.

        Here, in this process; a strategy whose replicas must be started per call (forked)
        overrides it and brings the model's new state back."""
        return fn(model, *args, **kwargs)

    # -- models -------------------------------------------------------------------------
    def place_model(self, module: nn.Module) -> nn.Module:
        """Put ``module``'s variables where this strategy keeps them, in place: on this
        replica's device (ShardedStrategy: sharded over the replicas). Returns ``module``."""
        return module.to(self.device)

    def prepare_for_training(self, module: nn.Module) -> nn.Module:
        """The module that training steps call: the module itself or a data-parallel wrapper."""
        return module

    def apply_sharding(self, module: nn.Module) -> nn.Module:
        """Place a freshly built model's parameters as this strategy keeps them (in place; used
        on the ``meta`` device before loading): sharded under `ShardedStrategy`, else as they are."""
        return module

    def describe(self) -> dict[str, Any]:
        """A JSON description of this strategy, recorded in artifacts for information."""
        return {"class": type(self).__name__, "num_replicas": self.num_replicas_in_sync,
                "device_type": self.device.type}

    # -- hooks --------------------------------------------------------------------------
    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def _all_gather(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        return tensor


class DistributedDataset:
    """A dataset whose every element is this replica's part of one global batch."""

    def __init__(self, dataset: Dataset, strategy: Strategy):
        self.dataset, self.strategy = dataset, strategy

    def __iter__(self) -> Iterator[Any]:
        seeds.follow_torch()
        seed = self.strategy.broadcast_object(seeds.draw_seed())
        own = self.dataset.replica_batches(seed, self.strategy.num_replicas_in_sync,
                                           self.strategy.replica_id)
        if own is not None:
            device = self.strategy.device
            return (pytree.tree_map(lambda t: t.to(device, non_blocking=True), part) for _, part in own)
        return (self.strategy.shard(batch) for batch in self.dataset.iterate(seed))

    def __len__(self) -> int:
        return len(self.dataset)
