"""Keras' everyday callbacks in fit: checkpoints, early stopping, schedules, loggers, NaN stop."""

import csv
import math

import pytest
import torch

from tests.conftest import read_reports, run_script, tiny_model

import distsave
from distsave.callbacks import (CSVLogger, EarlyStopping, LearningRateScheduler, ModelCheckpoint,
                                ReduceLROnPlateau, TensorBoard, TerminateOnNaN)
from distsave.saving.manifest import read_manifest


@pytest.fixture
def data(small_train):
    return small_train.take(4)



def test_model_checkpoint_formats_epoch_and_logged_values_into_the_path(tmp_path, model, data):
    history = model.fit(data, epochs=2, validation_data=data, verbose=0, callbacks=[
        ModelCheckpoint(str(tmp_path / "m-{epoch:02d}-{val_loss:.4f}"), save_best_only=False)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"m-{e + 1:02d}-{v:.4f}" for e, v in enumerate(history.history["val_loss"])]
    assert all(read_manifest(tmp_path / n)["training_state"]["epoch"] == i + 1 for i, n in enumerate(names))


def test_model_checkpoint_save_best_only_keeps_the_best_epochs_model(tmp_path, data):
    model = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    saved = {}

    class Record(distsave.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
    monitor = ModelCheckpoint(tmp_path / "best", monitor="val_accuracy", save_best_only=True)
    history = model.fit(data, epochs=3, validation_data=data.take(1), verbose=0, callbacks=[Record(), monitor])
    accuracy = history.history["val_accuracy"]
    best = max(range(3), key=lambda e: (accuracy[e], -e))
    best_state = distsave.load_model(tmp_path / "best").state_dict()
    assert all(torch.equal(best_state[k], saved[best][k]) for k in best_state)
    assert monitor.best == accuracy[best]


def test_model_checkpoint_weights_only_writes_one_safetensors_file(tmp_path, model, data):
    from safetensors.torch import load_file

    model.fit(data, epochs=1, verbose=0, callbacks=[ModelCheckpoint(tmp_path / "w-{step}.safetensors",
                                                                   save_weights_only=True, save_freq=2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w-2.safetensors", "w-4.safetensors"]
    weights = load_file(tmp_path / "w-4.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_model_checkpoint_under_two_replicas_writes_each_file_once(tmp_path):
    run_script("checkpoint_best.py", str(tmp_path), timeout=300)
    chief, other = read_reports(tmp_path / "report", 2)
    accuracy = chief["val_accuracy"]
    improvements = sum(1 for i, a in enumerate(accuracy) if all(a > b for b in accuracy[:i]))
    assert chief["written"] == improvements >= 1 and other["written"] == 0
    read_manifest(tmp_path / f"best-{max(range(4), key=lambda e: (accuracy[e], -e)) + 1:02d}")


def test_early_stopping_stops_and_restores_the_best_weights(model, data):
    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.95])
    kept = {}

    class FakeValidation(distsave.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = next(losses)
            kept[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
    history = model.fit(data, epochs=6, verbose=0, callbacks=[
        FakeValidation(), EarlyStopping(patience=2, restore_best_weights=True)])
    assert len(history.history["loss"]) == 4  # epochs 3 and 4 did not improve on epoch 2
    assert all(torch.equal(v, kept[1][k]) for k, v in model.state_dict().items())


def test_stop_training_set_in_a_batch_stops_fit_after_that_batch(model, data):
    class StopAtThree(distsave.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.stop_training = self.model.step == 3
    model.fit(data, epochs=5, verbose=0, callbacks=[StopAtThree()])
    assert model.step == 3 and model.epoch == 1


def test_learning_rate_scheduler_and_reduce_on_plateau_set_the_optimizer(model, data):
    history = model.fit(data, epochs=3, verbose=0, callbacks=[LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))])
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])
    model.optimizer.param_groups[0]["lr"] = 1.0
    plateau = ReduceLROnPlateau(monitor="flat", factor=0.5, patience=1, min_lr=0.3)

    class Flat(distsave.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["flat"] = 1.0
    history = model.fit(data, epochs=4, verbose=0, callbacks=[Flat(), plateau])
    assert history.history["learning_rate"] == [1.0, 1.0, 0.5, 0.3]
    assert model.optimizer.param_groups[0]["lr"] == 0.3


def test_terminate_on_nan_stops_at_the_first_nan_loss(model, data):
    with torch.no_grad():
        model.layers[1].weight[0, 0] = math.nan
    model.fit(data, epochs=3, verbose=0, callbacks=[TerminateOnNaN()])
    assert model.step == 1


def test_csv_logger_writes_a_row_per_epoch_and_appends(tmp_path, model, data):
    path = tmp_path / "log.csv"
    model.fit(data, epochs=2, verbose=0, callbacks=[CSVLogger(path)])
    model.fit(data, epochs=1, verbose=0, callbacks=[CSVLogger(path, append=True)])
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and list(rows[0]) == ["epoch", "accuracy", "loss"]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)


def test_tensorboard_writes_event_files_with_the_logged_scalars(tmp_path, model, data):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = model.fit(data, epochs=2, validation_data=data, verbose=0,
                        callbacks=[TensorBoard(tmp_path, update_freq=2)])
    train = EventAccumulator(str(tmp_path / "train")).Reload()
    validation = EventAccumulator(str(tmp_path / "validation")).Reload()
    assert [e.value for e in train.Scalars("epoch_loss")] == pytest.approx(history.history["loss"])
    assert [e.value for e in validation.Scalars("epoch_accuracy")] == pytest.approx(history.history["val_accuracy"])
    assert [e.step for e in train.Scalars("batch_loss")] == [2, 4, 6, 8]


def test_tensorboard_without_the_extra_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"distsave\[tensorboard\]"):
        TensorBoard("logs")
