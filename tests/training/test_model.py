import pytest
import torch
from torch import nn

from tests.conftest import cnn_model, tiny_model

import distsave
from distsave.training import callbacks, loop, metrics
from distsave.training.callbacks import ProgressBar


def test_sequential_counts_the_workflow_cnns_parameters():
    assert sum(p.numel() for p in cnn_model().parameters()) == 347_146


def test_inputs_are_unknown_until_the_first_call():
    model = cnn_model()
    assert model.inputs is None
    model(torch.zeros(3, 1, 28, 28))
    assert model.inputs[0].shape == (None, 1, 28, 28) and model.inputs[0].dtype == "float32"


def test_input_spec_can_be_given_and_is_enforced():
    model = cnn_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"expects inputs \(x: float32\[None, 1, 28, 28\]\).*uint8\[2, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_fit_returns_history_and_records_inputs(small_train):
    model = cnn_model()
    history = model.fit(small_train, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "accuracy"} and len(history.history["loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]
    assert model.inputs is not None and model.epoch == 2 and model.step == 32


def test_validation_data_adds_val_metrics(small_train, small_test):
    history = cnn_model().fit(small_train, epochs=1, validation_data=small_test, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_accuracy_resolves_from_the_loss_and_stays_resolved():
    model = tiny_model()
    assert isinstance(model.compiled_metrics[0], metrics.SparseCategoricalAccuracy)
    assert model.compiled_metrics[0].name == "accuracy"
    model.compile(loss="binary_crossentropy", optimizer="sgd", metrics=["accuracy"])
    assert isinstance(model.compiled_metrics[0], metrics.BinaryAccuracy)
    model.compile(loss=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam, metrics=["acc"])
    assert isinstance(model.compiled_metrics[0], metrics.SparseCategoricalAccuracy)


def test_evaluate_matches_a_hand_computed_accuracy(trained, small_test):
    images, labels = next(iter(small_test))
    logs = trained.evaluate(images, labels, batch_size=50, verbose=0, return_dict=True)
    with torch.no_grad():
        logits = trained(images)
    assert logs["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert logs["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_predict_keeps_order_across_batches(trained, small_test):
    images, _ = next(iter(small_test))
    with torch.no_grad():
        expected = trained(images)
    predicted = trained.predict(images, batch_size=7)
    # other batch sizes may round differently in BLAS; order and values must agree
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.predict(images, batch_size=128), expected, rtol=1e-5, atol=1e-5)


def test_optimizer_factories_and_instances():
    model = tiny_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    assert model.optimizer.defaults["lr"] == 0.5
    model.compile(loss="sparse_categorical_crossentropy", optimizer=torch.optim.AdamW(model.parameters()))
    assert isinstance(model.optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match="not this model's"):
        model.compile(loss="mse", optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1))


def test_progress_bar_prints_a_keras_style_line(small_train, capsys):
    model = cnn_model()
    model.fit(small_train, epochs=1, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/1" in out
    assert "16/16 [==============================]" in out
    assert "ms/step - loss: " in out and " - accuracy: " in out


def test_progress_bar_reads_metrics_at_a_bounded_rate(monkeypatch, capsys):
    """The default bar reads metrics (a device sync) at most every 0.25 s of a fake clock."""
    reads = []

    class Counting(metrics.Mean):
        def result(self):
            reads.append(1)
            return super().result()

    now = [1000.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now[0])
    bar = ProgressBar(live=True)
    bar.set_params({"epochs": 1, "steps": 300})
    bar.on_epoch_begin(0)
    metric = Counting("loss")
    metric.update_value(torch.tensor(0.5), 1)
    logs = loop._LiveLogs([metric])
    for step in range(100):  # 100 steps of 1 ms each: 0.1 s, under one interval
        now[0] += 0.001
        bar.on_train_batch_end(step, logs)
    assert reads == []  # no metric was read (no device sync) during the 100 steps
    for step in range(100, 300):  # 200 steps of 10 ms each: 2 s, at most 8 intervals
        now[0] += 0.01
        bar.on_train_batch_end(step, logs)
    assert 1 <= len(reads) <= 8
