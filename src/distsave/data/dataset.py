"""A small `tf.data`-style input pipeline over tensors.

Elements are tensors or tuples/dicts of tensors. Pipelines whose elements are still rows of
in-memory tensors (slices, `cache`, `shuffle`, `take`) are kept as a *table* — the tensors plus
an index order — so that `batch` gathers whole batches with one indexing call instead of
stacking Python objects, and so that the trainer can move the table to a device once.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from . import seeds

__all__ = ["Dataset", "Table"]

Element = Any


@dataclass(frozen=True)
class Table:
    """Rows of in-memory tensors in a given order: element ``i`` is ``tensors[order[i]]``."""

    tensors: Element
    order: torch.Tensor

    def gather(self, rows: torch.Tensor) -> Element:
        return pytree.tree_map(lambda t: t[rows], self.tensors)

    def __len__(self) -> int:
        return len(self.order)


def _check_structure(element: Element) -> None:
    leaves, _ = pytree.tree_flatten(element)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise TypeError(
            "Expected dataset elements made of torch.Tensors (a tensor, or a tuple/dict of "
            f"tensors). Received: {type(element).__name__} with leaves "
            f"{[type(leaf).__name__ for leaf in leaves]}. Convert arrays with torch.as_tensor."
        )


def _stack(elements: list[Element]) -> Element:
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *elements)


class Dataset:
    """An iterable pipeline of elements, built with chained methods as in `tf.data`.

    Example:
        >>> ds = Dataset.from_tensor_slices((torch.zeros(10, 3), torch.arange(10)))
        >>> [x.shape for x, y in ds.shuffle(10, seed=0).batch(4)]
        [torch.Size([4, 3]), torch.Size([4, 3]), torch.Size([2, 3])]
    """

    # -- constructors -------------------------------------------------------------------
    @staticmethod
    def from_tensor_slices(tensors: Element) -> Dataset:
        """Make a dataset whose elements are the slices of ``tensors`` along dimension 0."""
        tensors = pytree.tree_map(torch.as_tensor, tensors)
        _check_structure(tensors)
        lengths = {len(t) for t in pytree.tree_leaves(tensors)}
        if len(lengths) != 1:
            raise ValueError(
                "Expected tensors with the same first dimension in from_tensor_slices. "
                f"Received first dimensions {sorted(lengths)}."
            )
        return _Slices(tensors, lengths.pop())

    @staticmethod
    def from_generator(source: Any) -> Dataset:
        """Elements from a Python generator: pass the function that makes it (called each
        pass) or a generator object (read once). numpy arrays become tensors.

        Example:
            >>> ds = Dataset.from_generator(lambda: ((np.ones(3), i) for i in range(5)))
            >>> len(list(ds.batch(2)))
            3
        """
        from .streams import from_generator

        return from_generator(source)

    @staticmethod
    def from_dataloader(loader: Any) -> Dataset:
        """The batches of a ``torch.utils.data.DataLoader``. Under a multi-replica strategy each
        replica loads only its part of each global batch (shuffle on or off; see
        `distsave.data.streams`)."""
        from .streams import from_dataloader

        return from_dataloader(loader)

    # -- transformations ----------------------------------------------------------------
    def map(self, fn: Callable[..., Element]) -> Dataset:
        """Apply ``fn`` to every element; tuple elements are unpacked into arguments."""
        return _Map(self, fn)

    def cache(self) -> Dataset:
        """Keep the elements in memory after the first pass, so ``map`` runs once."""
        return _Cache(self)

    def shuffle(self, buffer_size: int, seed: int | None = None) -> Dataset:
        """Shuffle through a buffer of ``buffer_size`` elements, afresh on every pass."""
        if buffer_size < 1:
            raise ValueError(f"Expected buffer_size >= 1. Received: buffer_size={buffer_size}.")
        return _Shuffle(self, buffer_size, seed)

    def batch(self, batch_size: int, drop_remainder: bool = False) -> Dataset:
        """Stack consecutive elements into batches of ``batch_size`` (last one may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}.")
        return _Batch(self, batch_size, drop_remainder)

    def take(self, count: int) -> Dataset:
        """Keep at most the first ``count`` elements."""
        return _Take(self, count)

    def prefetch(self, buffer_size: int = 2) -> Dataset:
        """Prepare up to ``buffer_size`` elements ahead in a background thread."""
        return _Prefetch(self, max(1, buffer_size))

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Element]:
        seeds.follow_torch()
        return self.iterate(seed=seeds.draw_seed())

    def iterate(self, seed: int) -> Iterator[Element]:
        """Iterate with ``seed`` driving unseeded shuffles; replicas pass the same seed."""
        table = self.table(seed)
        if table is not None:
            return (table.gather(i) for i in table.order)
        return self._elements(seed)

    def table(self, seed: int) -> Table | None:
        """This pass's rows as a `Table`, or None where elements are computed on the fly."""
        return None

    def __len__(self) -> int:
        n = self.cardinality()
        if n is None:
            raise TypeError("The length of this dataset is unknown before it is iterated.")
        return n

    def cardinality(self) -> int | None:
        """Number of elements, or None when unknown."""
        return None

    def replica_batches(self, seed: int, num_replicas: int,
                        replica_id: int) -> Iterator[tuple[int, Element]] | None:
        """``(global batch size, this replica's part)`` per batch where this dataset can read each
        replica's part alone; None where each replica reads whole batches and keeps its part."""
        return None

    def _elements(self, seed: int) -> Iterator[Element]:
        raise NotImplementedError


class _Slices(Dataset):
    def __init__(self, tensors: Element, length: int):
        self._tensors = tensors
        self._length = length

    def table(self, seed: int) -> Table:
        return Table(self._tensors, torch.arange(self._length))

    def cardinality(self) -> int:
        return self._length


class _Map(Dataset):
    def __init__(self, parent: Dataset, fn: Callable[..., Element]):
        self._parent, self._fn = parent, fn
        self._vectorises = True  # until vmap fails on fn once

    def table(self, seed: int) -> Table | None:
        """An in-memory parent mapped in one vectorised call each pass (as `cache` maps it once),
        so an uncached evaluation pipeline does not run ``fn`` per element in Python."""
        stacked = self.mapped_table(seed) if self._vectorises else None
        if stacked is None:
            return None
        return Table(stacked, torch.arange(len(pytree.tree_leaves(stacked)[0])))

    def _call(self, element: Element) -> Element:
        out = self._fn(*element) if isinstance(element, tuple) else self._fn(element)
        _check_structure(out)
        return out

    def _elements(self, seed: int) -> Iterator[Element]:
        for element in self._parent.iterate(seed):
            yield self._call(element)

    def mapped_table(self, seed: int) -> Element | None:
        """Every element mapped at once with ``torch.vmap`` (what `cache` stores), or None
        where the parent is not a table or ``fn`` is not vmap-able (then it runs per element).
        vmap gives exactly the per-element results, so the choice is invisible."""
        table = self._parent.table(seed)
        if table is None:
            return None
        rows = table.gather(table.order)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.vmap(self._call)(rows)
        except Exception:  # data-dependent Python, randomness, in-place ops: map per element
            self._vectorises = False
            return None

    def cardinality(self) -> int | None:
        return self._parent.cardinality()


class _Cache(Dataset):
    def __init__(self, parent: Dataset):
        self._parent = parent
        self._table: Table | None = None

    def table(self, seed: int) -> Table:
        if self._table is None:
            stacked = self._parent.mapped_table(seed) if isinstance(self._parent, _Map) else None
            if stacked is None:
                elements = list(self._parent.iterate(seed))
                if not elements:
                    raise ValueError("Cannot cache an empty dataset.")
                stacked = _stack(elements)
            self._table = Table(stacked, torch.arange(len(pytree.tree_leaves(stacked)[0])))
        return self._table

    def cardinality(self) -> int | None:
        return len(self._table) if self._table is not None else self._parent.cardinality()


class _Shuffle(Dataset):
    def __init__(self, parent: Dataset, buffer_size: int, seed: int | None):
        self._parent, self._buffer_size, self._seed = parent, buffer_size, seed
        self._passes = 0

    def _pass_seed(self, seed: int) -> int:
        base = seed if self._seed is None else self._seed
        self._passes += 1
        return (base * 1_000_003 + self._passes) % 2**63

    def table(self, seed: int) -> Table | None:
        parent = self._parent.table(seed)
        if parent is None:
            return None
        rng = np.random.default_rng(self._pass_seed(seed))
        positions = torch.from_numpy(buffered_shuffle_positions(len(parent), self._buffer_size, rng))
        return Table(parent.tensors, parent.order[positions])

    def _elements(self, seed: int) -> Iterator[Element]:
        rng = np.random.default_rng(self._pass_seed(seed))
        return streaming_shuffle(self._parent.iterate(seed), self._buffer_size, rng)

    def cardinality(self) -> int | None:
        return self._parent.cardinality()


def buffered_shuffle_positions(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order tf.data's ``shuffle(buffer_size)`` gives ``n`` items, computed without a loop.

    tf.data fills a buffer with the first ``buffer_size`` items; then for each further item it
    emits a random buffered item and puts the new one in its slot; at the end it emits the
    buffer in random order. The item emitted at step ``t`` is whatever was last put into the
    chosen slot before ``t``: grouping the steps by slot gives every answer at once.
    """
    if buffer_size >= n:
        return rng.permutation(n)
    steps = n - buffer_size
    slots = rng.integers(0, buffer_size, size=steps)
    incoming = np.arange(buffer_size, n)
    by_slot = np.lexsort((np.arange(steps), slots))
    slot_sorted, incoming_sorted = slots[by_slot], incoming[by_slot]
    same_slot_before = np.r_[False, slot_sorted[1:] == slot_sorted[:-1]]
    emitted = np.empty(steps, dtype=np.int64)
    emitted[by_slot] = np.where(same_slot_before, np.r_[0, incoming_sorted[:-1]], slot_sorted)
    last_in_slot = np.r_[slot_sorted[1:] != slot_sorted[:-1], True]
    remaining = np.arange(buffer_size)
    remaining[slot_sorted[last_in_slot]] = incoming_sorted[last_in_slot]
    return np.concatenate([emitted, rng.permutation(remaining)])


def streaming_shuffle(items: Iterator[Element], buffer_size: int,
                      rng: np.random.Generator) -> Iterator[Element]:
    """tf.data's ``shuffle(buffer_size)`` over a stream, holding at most ``buffer_size`` items.

    It draws from ``rng`` exactly as `buffered_shuffle_positions` does, so a stream and a table
    of the same rows come out in the same order.
    """
    buffer: list[Element] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(0, buffer_size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


class _Batch(Dataset):
    def __init__(self, parent: Dataset, batch_size: int, drop_remainder: bool):
        self._parent, self.batch_size, self._drop = parent, batch_size, drop_remainder

    def row_batches(self, seed: int) -> tuple[Table, list[torch.Tensor]] | None:
        """The parent's rows and this pass's index batches, or None if not table-backed."""
        parent = self._parent.table(seed)
        if parent is None:
            return None
        batches = list(torch.split(parent.order, self.batch_size))
        if self._drop and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return parent, batches

    def iterate(self, seed: int) -> Iterator[Element]:
        rows = self.row_batches(seed)
        if rows is not None:
            table, batches = rows
            return (table.gather(b) for b in batches)
        return self._elements(seed)

    def _elements(self, seed: int) -> Iterator[Element]:
        pending: list[Element] = []
        for element in self._parent.iterate(seed):
            pending.append(element)
            if len(pending) == self.batch_size:
                yield _stack(pending)
                pending = []
        if pending and not self._drop:
            yield _stack(pending)

    def cardinality(self) -> int | None:
        n = self._parent.cardinality()
        if n is None:
            return None
        return n // self.batch_size if self._drop else -(-n // self.batch_size)


class _Take(Dataset):
    def __init__(self, parent: Dataset, count: int):
        self._parent, self._count = parent, count

    def table(self, seed: int) -> Table | None:
        parent = self._parent.table(seed)
        return None if parent is None else Table(parent.tensors, parent.order[: self._count])

    def _elements(self, seed: int) -> Iterator[Element]:
        for i, element in enumerate(self._parent.iterate(seed)):
            if i >= self._count:
                return
            yield element

    def cardinality(self) -> int | None:
        n = self._parent.cardinality()
        return None if n is None else min(n, self._count)


class _Prefetch(Dataset):
    _DONE = object()

    def __init__(self, parent: Dataset, buffer_size: int):
        self._parent, self._buffer_size = parent, buffer_size

    def row_batches(self, seed: int):
        rows = getattr(self._parent, "row_batches", None)
        return rows(seed) if rows else None

    def _elements(self, seed: int) -> Iterator[Element]:
        slots: queue.Queue = queue.Queue(self._buffer_size)
        stop = threading.Event()

        def produce() -> None:
            try:
                for element in self._parent.iterate(seed):
                    if stop.is_set():
                        return
                    slots.put(element)
                slots.put(self._DONE)
            except BaseException as error:  # handed to the consumer, re-raised there
                slots.put(error)

        threading.Thread(target=produce, daemon=True).start()
        try:
            while (item := slots.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def cardinality(self) -> int | None:
        return self._parent.cardinality()
