"""fit / evaluate / predict take numpy arrays, DataLoaders, torch datasets and generators, and
Keras' keyword arguments; every input kind trains exactly as the in-memory Dataset path does."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import distsave
from distsave.data import Dataset

X = torch.randn(96, 6, generator=torch.Generator().manual_seed(3))
Y = (X[:, 0] + X[:, 1] > 0).long()


def mlp(optimizer="sgd") -> distsave.Sequential:
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def trained_weights(data, **fit_args) -> list[torch.Tensor]:
    model = mlp()
    model.fit(data, epochs=2, verbose=0, **fit_args)
    return [p.detach().clone() for p in model.parameters()]


class Rows(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


def batches():
    for start in range(0, len(X), 32):
        yield X[start:start + 32].numpy(), Y[start:start + 32].numpy()


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    return trained_weights(Dataset.from_tensor_slices((X, Y)).batch(32))


@pytest.mark.parametrize("make", [
    lambda: dict(x=X.numpy(), y=Y.numpy(), batch_size=32, shuffle=False),
    lambda: dict(x=DataLoader(TensorDataset(X, Y), batch_size=32)),
    lambda: dict(x=TensorDataset(X, Y), batch_size=32, shuffle=False),
    lambda: dict(x=Rows(), batch_size=32),
    lambda: dict(x=Dataset.from_generator(batches)),
    lambda: dict(x=Dataset.from_dataloader(DataLoader(TensorDataset(X, Y), batch_size=32, num_workers=1))),
    lambda: dict(x=Dataset.from_generator(lambda: zip(X.numpy(), Y.numpy())).batch(32)),
], ids=["numpy", "dataloader", "map_style", "iterable", "generator", "loader_workers", "rows"])
def test_every_input_kind_trains_exactly_as_the_dataset_path(reference, make):
    args = make()
    data = args.pop("x")
    for mine, theirs in zip(trained_weights(data, **args), reference):
        assert torch.equal(mine, theirs)


def test_a_shuffled_dataloader_repeats_after_torch_manual_seed():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    torch.manual_seed(7)
    first = [y.tolist() for _, y in Dataset.from_dataloader(loader)]
    torch.manual_seed(7)
    again = [y.tolist() for _, y in Dataset.from_dataloader(loader)]
    assert first == again and sorted(sum(first, [])) == sorted(Y.tolist())
    assert first != [y.tolist() for _, y in Dataset.from_dataloader(loader)]


def test_steps_per_epoch_reads_an_endless_generator_on_across_epochs():
    def endless():
        while True:
            yield X[:8], Y[:8]
    model = mlp()
    history = model.fit(endless(), epochs=3, steps_per_epoch=5, verbose=0)
    assert model.step == 15 and len(history.history["loss"]) == 3


def test_a_spent_generator_object_says_how_to_read_it_again():
    model = mlp()
    with pytest.raises(ValueError, match="iterated once.*from_generator"):
        model.fit(batches(), epochs=2, verbose=0)


def test_validation_split_holds_out_the_last_part_before_shuffling():
    model = mlp()
    history = model.fit(X, Y, epochs=1, validation_split=0.25, verbose=0)
    held_out = model.evaluate(X[72:], Y[72:], verbose=0, return_dict=True)
    assert history.history["val_loss"][0] == pytest.approx(held_out["loss"], rel=1e-6)
    assert model.step == 3  # 72 training examples in batches of 32


def test_validation_freq_and_initial_epoch_follow_keras():
    model = mlp()
    history = model.fit(X, Y, epochs=5, initial_epoch=1, validation_data=(X, Y), validation_freq=2,
                        verbose=0)
    assert history.epoch == [1, 2, 3, 4] and model.epoch == 5
    assert len(history.history["loss"]) == 4 and len(history.history["val_loss"]) == 2


def test_class_weight_scales_each_examples_loss():
    model = mlp()
    model.compile(optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
                  loss="sparse_categorical_crossentropy")
    with torch.no_grad():
        per_example = nn.functional.cross_entropy(model(X), Y, reduction="none")
    weights = torch.where(Y == 1, 3.0, 1.0)
    history = model.fit(X, Y, batch_size=96, class_weight={1: 3.0}, verbose=0)
    assert history.history["loss"][0] == pytest.approx((per_example * weights).mean().item(), rel=1e-5)


def test_sample_weights_in_a_dataset_equal_sample_weight_arrays():
    weights = torch.rand(96, generator=torch.Generator().manual_seed(0))
    from_arrays = trained_weights(X, y=Y, sample_weight=weights, batch_size=32, shuffle=False)
    from_triples = trained_weights(Dataset.from_tensor_slices((X, Y, weights)).batch(32))
    unweighted = trained_weights(X, y=Y, batch_size=32, shuffle=False)
    assert all(torch.equal(a, b) for a, b in zip(from_arrays, from_triples))
    assert not all(torch.equal(a, b) for a, b in zip(from_arrays, unweighted))


def test_evaluate_and_predict_take_a_dataloader_and_numpy():
    model = mlp()
    loader = DataLoader(TensorDataset(X, Y), batch_size=40)
    assert model.evaluate(loader, verbose=0) == pytest.approx(model.evaluate(X, Y, verbose=0))
    torch.testing.assert_close(model.predict(X.numpy()), model.predict(DataLoader(TensorDataset(X), batch_size=7)))


def test_unknown_data_says_what_is_accepted():
    with pytest.raises(TypeError, match="DataLoader.*generator.*Received: str"):
        mlp().fit("train.csv", verbose=0)
