"""Streams: generators and DataLoaders as datasets, and a shuffle that holds only its buffer."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distsave.data import Dataset


def test_a_streamed_shuffle_gives_the_order_of_the_same_rows_in_memory():
    rows = torch.arange(500)
    in_memory = Dataset.from_tensor_slices(rows).shuffle(64, seed=3).batch(500)
    streamed = Dataset.from_generator(lambda: iter(rows)).shuffle(64, seed=3).batch(500)
    assert torch.equal(next(iter(in_memory)), next(iter(streamed)))


def test_a_shuffle_over_a_stream_holds_only_its_buffer():
    pulled = []

    def stream():
        for i in range(100_000):
            pulled.append(i)
            yield torch.tensor(i)
    first = [int(t) for t in itertools.islice(iter(Dataset.from_generator(stream).shuffle(10, seed=0)), 5)]
    assert len(pulled) == 15 and len(set(first)) == 5 and max(first) < 15


def test_replicas_of_a_dataloader_load_disjoint_parts_of_each_global_batch():
    loader = DataLoader(TensorDataset(torch.arange(50)), batch_size=8, shuffle=True)
    data = Dataset.from_dataloader(loader)
    whole = [(size, part[0]) for size, part in data.replica_batches(11, 1, 0)]
    halves = [list(data.replica_batches(11, 2, r)) for r in (0, 1)]
    assert [size for size, _ in whole] == [8] * 6 + [2]
    for (size, batch), (size0, (part0,)), (size1, (part1,)) in zip(whole, *halves):
        assert size == size0 == size1 and torch.equal(torch.cat([part0, part1]), batch)
    assert sorted(torch.cat([b for _, b in whole]).tolist()) == list(range(50))


def test_a_global_batch_smaller_than_the_replicas_leaves_an_empty_part():
    data = Dataset.from_dataloader(DataLoader(TensorDataset(torch.arange(5)), batch_size=4))
    last = [list(data.replica_batches(0, 3, r))[-1] for r in range(3)]
    assert [(size, len(part[0])) for size, part in last] == [(1, 1), (1, 0), (1, 0)]


def test_generator_elements_become_tensors():
    import numpy as np
    data = Dataset.from_generator(lambda: ((np.ones(3, dtype=np.float32), 1) for _ in range(4))).batch(2)
    x, y = next(iter(data))
    assert x.dtype == torch.float32 and x.shape == (2, 3) and torch.equal(y, torch.tensor([1, 1]))


def test_from_dataloader_refuses_other_objects():
    with pytest.raises(TypeError, match="Expected a torch.utils.data.DataLoader. Received: list"):
        Dataset.from_dataloader([1, 2])
