"""Datasets over data that is not in memory: Python generators and ``torch.utils.data`` loaders.

A `DataLoader` over a map-style dataset with a plain sampler (``shuffle=True`` or False) is read
*per replica*: every pass, the order of the whole dataset is drawn from the pass seed (the same on
every replica), cut into global batches of the loader's ``batch_size``, and each replica loads
only its contiguous part of each global batch, through the loader's own workers and collate
function. So N replicas train on exactly the batches one replica would, and none reads another's
examples. Other loaders (an ``IterableDataset``, a custom sampler) and generators are *streams*:
every replica reads the stream and keeps its part of each global batch; shard such a source
yourself (for example by ``torch.distributed.get_rank()``) where reading it twice is too slow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from .dataset import Dataset, Element

__all__ = ["from_dataloader", "from_generator"]


def _as_tensors(element: Any) -> Element:
    """numpy arrays and Python numbers become tensors; tensors pass through."""
    def leaf(value: Any) -> Any:
        if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
            return torch.as_tensor(value)
        return value
    return pytree.tree_map(leaf, element)


class _Generator(Dataset):
    """Elements from a function returning an iterable (called each pass), or a one-shot iterator."""

    def __init__(self, source: Callable[[], Iterable[Any]] | Iterable[Any]):
        self._source = source
        self._used = False

    def _elements(self, seed: int) -> Iterator[Element]:
        if callable(self._source):
            items = self._source()
        elif iter(self._source) is self._source:  # a generator object: it can run once
            if self._used:
                raise ValueError(
                    "This dataset reads a generator object, which can be iterated once; a second "
                    "pass (a second epoch, or evaluate after fit) found it spent. Pass the function "
                    "that makes the generator (Dataset.from_generator(make_batches)), or give fit "
                    "steps_per_epoch= so that epochs keep reading the same generator.")
            self._used = True
            items = self._source
        else:
            items = self._source
        return (_as_tensors(item) for item in items)

    def cardinality(self) -> int | None:
        try:
            return len(self._source)  # type: ignore[arg-type]
        except TypeError:
            return None


class _PassPlan(Sampler):
    """The batch sampler of this replica's loader: this pass's index lists, set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _splittable(loader: DataLoader) -> bool:
    """Whether the loader's order is one we can draw ourselves: map-style, shuffle on or off."""
    if isinstance(loader.dataset, IterableDataset) or not isinstance(loader.batch_sampler, BatchSampler):
        return False
    sampler = loader.batch_sampler.sampler
    if isinstance(sampler, RandomSampler):
        return not sampler.replacement and sampler._num_samples is None
    return isinstance(sampler, SequentialSampler)


class _Loader(Dataset):
    """The batches of a ``torch.utils.data.DataLoader`` (see the module docstring)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self._split = _splittable(loader)
        self._plan = _PassPlan()
        self._replica_loader: DataLoader | None = None

    def _elements(self, seed: int) -> Iterator[Element]:
        if not self._split:
            return (_as_tensors(batch) for batch in self.loader)
        return (batch for _, batch in self.replica_batches(seed, 1, 0))

    def _global_batches(self, seed: int) -> list[torch.Tensor]:
        n = len(self.loader.dataset)  # type: ignore[arg-type]
        if isinstance(self.loader.batch_sampler.sampler, RandomSampler):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed % 2**63))
        else:
            order = torch.arange(n)
        size = self.loader.batch_sampler.batch_size
        batches = list(torch.split(order, size))
        if self.loader.batch_sampler.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def replica_batches(self, seed: int, num_replicas: int,
                        replica_id: int) -> Iterator[tuple[int, Element]] | None:
        """``(global batch size, this replica's part)`` for one pass, each replica loading only
        its own examples; None where the loader's order cannot be split (read it as a stream)."""
        if not self._split:
            return None
        batches = self._global_batches(seed)
        parts = [torch.tensor_split(b, num_replicas)[replica_id] for b in batches]
        # A global batch smaller than the replica count leaves some replicas nothing: they load
        # one example and keep none of it, so the step still sees tensors of the right layout.
        self._plan.batches = [(p if len(p) else b[:1]).tolist() for p, b in zip(parts, batches)]
        return self._load(iter(self._loader()), parts, batches)

    @staticmethod
    def _load(loaded: Iterator[Any], parts: list[torch.Tensor],
              batches: list[torch.Tensor]) -> Iterator[tuple[int, Element]]:
        for part, batch in zip(parts, batches):
            tensors = _as_tensors(next(loaded))
            yield len(batch), tensors if len(part) else _empty(tensors)

    def _loader(self) -> DataLoader:
        if self._replica_loader is None:
            source = self.loader
            options = dict(num_workers=source.num_workers, collate_fn=source.collate_fn,
                           pin_memory=source.pin_memory, timeout=source.timeout,
                           worker_init_fn=source.worker_init_fn,
                           multiprocessing_context=source.multiprocessing_context,
                           persistent_workers=source.persistent_workers,
                           pin_memory_device=source.pin_memory_device, in_order=source.in_order)
            if source.num_workers:
                options["prefetch_factor"] = source.prefetch_factor
            self._replica_loader = DataLoader(source.dataset, batch_sampler=self._plan, **options)
        return self._replica_loader

    def cardinality(self) -> int | None:
        try:
            return len(self.loader)
        except TypeError:
            return None


def _empty(batch: Element) -> Element:
    return pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, batch)


def from_generator(source: Callable[[], Iterable[Any]] | Iterable[Any]) -> Dataset:
    """A dataset of what ``source`` yields (tensors, numpy arrays, or tuples/dicts of them)."""
    if not (callable(source) or isinstance(source, Iterable)):
        raise TypeError("Expected a function returning an iterable, or an iterable (a generator). "
                        f"Received: {type(source).__name__}.")
    return _Generator(source)


def from_dataloader(loader: DataLoader) -> Dataset:
    """A dataset whose elements are ``loader``'s batches, read per replica where possible."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"Expected a torch.utils.data.DataLoader. Received: {type(loader).__name__}.")
    return _Loader(loader)
