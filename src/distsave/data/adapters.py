"""What `fit`, `evaluate` and `predict` accept as data, turned into one `Dataset`.

Keras' inputs, with PyTorch's own: a distsave `Dataset`; tensors or numpy arrays (a tuple or
dict of them for several inputs) with ``y`` and ``sample_weight``; a
``torch.utils.data.DataLoader``; a map-style or iterable ``torch.utils.data.Dataset`` (batched
here with ``batch_size``); a generator of batches. Arrays stay in-memory tables (the fast path);
everything else streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from .dataset import Dataset
from .streams import from_dataloader, from_generator

__all__ = ["as_dataset", "is_arrays", "split_validation"]

_ARRAYS = (torch.Tensor, np.ndarray)


def is_arrays(x: Any) -> bool:
    leaves = pytree.tree_leaves(x)
    return bool(leaves) and all(isinstance(leaf, _ARRAYS) for leaf in leaves)


def _arrays(x: Any, y: Any, sample_weight: Any) -> Any:
    if y is None:
        return (x,)  # an (inputs,) tuple: inputs that are themselves a tuple stay one thing
    return (x, y) if sample_weight is None else (x, y, sample_weight)


def as_dataset(x: Any, y: Any = None, *, sample_weight: Any = None, batch_size: int = 32,
               shuffle: bool = False) -> Any:
    """One `Dataset` for ``x`` (a `DistributedDataset` passes through unchanged).

    Raises:
        TypeError: ``x`` is none of the accepted kinds. ValueError: ``y``/``sample_weight``
            given with a dataset, loader or generator (they carry their own).
    """
    from ..strategies import DistributedDataset  # data flows into strategies, not back

    if isinstance(x, (Dataset, DistributedDataset, DataLoader, TorchDataset, Iterator)):
        if y is not None or sample_weight is not None:
            raise ValueError(f"Pass labels (and sample weights) inside the {type(x).__name__}: its "
                             "elements are (inputs, labels) or (inputs, labels, weights). y= and "
                             "sample_weight= are only for tensor or numpy inputs.")
    if isinstance(x, (Dataset, DistributedDataset)):
        return x
    if isinstance(x, DataLoader):
        return from_dataloader(x)
    if isinstance(x, IterableDataset):
        return from_dataloader(DataLoader(x, batch_size=batch_size))
    if isinstance(x, TorchDataset):
        return from_dataloader(DataLoader(x, batch_size=batch_size, shuffle=shuffle))
    if isinstance(x, Iterator):
        return from_generator(x)
    if is_arrays(x):
        if sample_weight is not None and y is None:
            raise ValueError("sample_weight= needs labels: pass y= too.")
        data = Dataset.from_tensor_slices(_arrays(x, y, sample_weight))
        return (data.shuffle(len(data)) if shuffle else data).batch(batch_size)
    raise TypeError(
        "Expected data as a distsave Dataset, tensors or numpy arrays (a tuple or dict of them for "
        "several inputs), a torch.utils.data.DataLoader, a torch Dataset or IterableDataset, or a "
        f"generator of (inputs, labels) batches. Received: {type(x).__name__}.")


def split_validation(x: Any, y: Any, sample_weight: Any, fraction: float) -> tuple[tuple, tuple]:
    """Keras' ``validation_split``: the last ``fraction`` of the arrays, taken before shuffling."""
    if not 0 < fraction < 1:
        raise ValueError(f"Expected 0 < validation_split < 1. Received: {fraction}.")
    if not is_arrays(x):
        raise ValueError("validation_split works on tensors or numpy arrays only (it cuts the last "
                         f"part of them). Received x of type {type(x).__name__}: pass "
                         "validation_data= instead.")
    n = len(pytree.tree_leaves(x)[0])
    cut = n - int(n * fraction)
    if cut <= 0 or cut >= n:
        raise ValueError(f"validation_split={fraction} of {n} examples leaves an empty part.")

    def part(value: Any, rows: slice) -> Any:
        return None if value is None else pytree.tree_map(lambda t: t[rows], value)
    return ((part(x, slice(0, cut)), part(y, slice(0, cut)), part(sample_weight, slice(0, cut))),
            (part(x, slice(cut, n)), part(y, slice(cut, n)), part(sample_weight, slice(cut, n))))
