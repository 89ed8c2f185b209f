"""Modes as Keras users expect them: fit trains and puts the mode back, evaluate / predict /
a loaded model infer, ``model(x, training=...)`` is honoured, BatchNorm statistics only move in
training; and a failed first call records no input spec."""

import pytest
import torch
from torch import nn

import distsave

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
Y = (X[:, 0] > 1).long()


def batchnorm_model() -> distsave.Sequential:
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


class ModeSpy(distsave.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.training = self.model.training


def test_fit_trains_in_train_mode_and_puts_back_the_mode_it_found():
    model = batchnorm_model().eval()
    spy = ModeSpy()
    model.fit(X, Y, epochs=1, verbose=0, callbacks=[spy])
    assert spy.training is True and model.training is False


def test_evaluate_and_predict_leave_batchnorm_statistics_and_the_mode_alone():
    model = batchnorm_model()
    model.fit(X, Y, epochs=1, verbose=0)
    stats = running_stats(model)
    model.evaluate(X, Y, verbose=0)
    model.predict(X)
    assert model.training is True
    assert all(torch.equal(a, b) for a, b in zip(stats, running_stats(model)))


def test_a_loaded_model_infers_when_called_and_equals_predict(tmp_path):
    model = batchnorm_model()
    model.fit(X, Y, epochs=2, verbose=0)
    model.save(tmp_path / "bn")
    loaded = distsave.load_model(tmp_path / "bn")
    stats = running_stats(loaded)
    assert loaded.training is False
    torch.testing.assert_close(loaded(X), loaded.predict(X))
    torch.testing.assert_close(loaded(X), model.predict(X))
    assert all(torch.equal(a, b) for a, b in zip(stats, running_stats(loaded)))


def test_training_argument_runs_one_call_in_that_mode():
    model = batchnorm_model().eval()
    stats = running_stats(model)
    model(X, training=False)
    assert all(torch.equal(a, b) for a, b in zip(stats, running_stats(model)))
    model(X, training=True)
    assert not torch.equal(stats[0], running_stats(model)[0]) and model.training is False


def test_a_wrong_first_call_records_nothing_and_the_right_data_then_trains():
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10)])
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, 28, 28, 1))  # NHWC: the convolution refuses it
    assert model.inputs is None
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), verbose=0)
    assert model.inputs[0].shape == (None, 1, 28, 28)


def test_a_mismatch_names_the_recorded_spec_and_how_to_reset_it():
    model = batchnorm_model()
    model(X)
    with pytest.raises(ValueError, match=r"x: float32\[None, 4\].*first successful call.*"
                                         r"float32\[2, 5\].*model.input_spec = None"):
        model(torch.zeros(2, 5))
    model.input_spec = None
    with pytest.raises(RuntimeError):  # the network itself refuses 5 features
        model(torch.zeros(2, 5))


def test_a_loaded_program_is_callable_and_a_missing_signature_lists_the_names(tmp_path):
    model = batchnorm_model()
    model.fit(X, Y, epochs=1, verbose=0)
    distsave.saved_model.save(model, tmp_path / "sm")
    loaded = distsave.saved_model.load(tmp_path / "sm")
    torch.testing.assert_close(loaded(X)["output_0"], model.predict(X))
    with pytest.raises(KeyError, match="No signature 'serve'.*Available: 'serving_default'"):
        loaded.signatures["serve"]
