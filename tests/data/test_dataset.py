import pytest
import torch

from distsave.data import Dataset


def numbers(n: int = 10) -> Dataset:
    return Dataset.from_tensor_slices((torch.arange(n), torch.arange(n) * 10))


def test_from_tensor_slices_yields_rows_in_order():
    assert [int(x) for x, _ in numbers(4)] == [0, 1, 2, 3]
    assert len(numbers(4)) == 4


def test_from_tensor_slices_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same first dimension"):
        Dataset.from_tensor_slices((torch.zeros(3), torch.zeros(4)))


def test_map_unpacks_tuples_and_runs_per_element():
    out = [(int(a), int(b)) for a, b in numbers(3).map(lambda x, y: (x + 1, y * 2))]
    assert out == [(1, 0), (2, 20), (3, 40)]


def test_map_must_return_tensors():
    with pytest.raises(TypeError, match="torch.Tensors"):
        list(numbers(2).map(lambda x, y: "text"))


def test_cache_runs_map_only_once():
    calls = []

    def counted(x, y):
        calls.append(1)
        return x, y

    ds = numbers(5).map(counted).cache()
    first = [int(x) for x, _ in ds]
    after_first_pass = len(calls)
    assert [int(x) for x, _ in ds] == first == [0, 1, 2, 3, 4]
    assert after_first_pass >= 1 and len(calls) == after_first_pass  # not run again


def test_cache_maps_data_dependent_functions_per_element():
    ds = numbers(4).map(lambda x, y: (x * 2, y) if int(x) % 2 else (x, y)).cache()
    assert [int(x) for x, _ in ds] == [0, 2, 2, 6]


def test_batch_stacks_and_keeps_the_smaller_last_batch():
    shapes = [x.shape[0] for x, _ in numbers(10).batch(4)]
    assert shapes == [4, 4, 2]
    assert len(numbers(10).batch(4)) == 3
    assert [x.shape[0] for x, _ in numbers(10).batch(4, drop_remainder=True)] == [4, 4]
    assert len(numbers(10).batch(4, drop_remainder=True)) == 2


def test_batch_of_mapped_elements_matches_the_table_path():
    computed = [x for x, _ in numbers(10).map(lambda x, y: (x * 1, y)).batch(4)]
    table = [x for x, _ in numbers(10).batch(4)]
    assert all(torch.equal(a, b) for a, b in zip(computed, table))


def test_shuffle_is_a_permutation_and_reshuffles_every_pass():
    ds = numbers(100).shuffle(100, seed=3)
    first, second = [int(x) for x, _ in ds], [int(x) for x, _ in ds]
    assert sorted(first) == list(range(100)) == sorted(second)
    assert first != second


def test_seeded_shuffle_repeats_across_fresh_pipelines():
    a = [int(x) for x, _ in numbers(50).shuffle(10, seed=7)]
    b = [int(x) for x, _ in numbers(50).shuffle(10, seed=7)]
    assert a == b


def test_small_shuffle_buffer_only_moves_elements_locally():
    order = [int(x) for x, _ in numbers(1000).shuffle(10, seed=0)]
    assert order[0] < 10  # the first element comes from the first buffer, as in tf.data


def test_shuffle_before_batch_reshuffles_batches_each_epoch():
    ds = numbers(64).shuffle(64, seed=1).batch(8)
    assert not torch.equal(next(iter(ds))[0], next(iter(ds))[0])


def test_take_limits_and_knows_its_length():
    assert len(numbers(10).take(3)) == 3
    assert [int(x) for x, _ in numbers(10).map(lambda x, y: (x, y)).take(2)] == [0, 1]


def test_prefetch_yields_the_same_elements_and_passes_errors_on():
    ds = numbers(20).map(lambda x, y: (x, y))
    assert [int(x) for x, _ in ds.prefetch(3)] == list(range(20))

    def boom(x, y):
        raise RuntimeError("bad element")

    with pytest.raises(RuntimeError, match="bad element"):
        list(numbers(3).map(boom).prefetch(2))


def test_unknown_length_raises_type_error():
    def gen():
        yield from []

    class Stream(Dataset):
        def _elements(self, seed):
            return gen()

    with pytest.raises(TypeError, match="unknown"):
        len(Stream())


def test_invalid_arguments_name_the_setting():
    with pytest.raises(ValueError, match="batch_size"):
        numbers().batch(0)
    with pytest.raises(ValueError, match="buffer_size"):
        numbers().shuffle(0)
