"""CheckpointManager: retention policies, restore, an index that is never stale or half-written."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, SCRIPTS, tiny_model

import distsave
from distsave.saving import checkpoint_manager
from distsave.saving.checkpoint_manager import INDEX
from distsave.saving.manifest import read_manifest



def _steps(manager):
    return [c.step for c in manager.checkpoints]


def test_retention_keeps_the_newest_and_every_nth(tmp_path, model):
    manager = distsave.CheckpointManager(tmp_path, max_to_keep=2, keep_checkpoint_every_n_steps=4)
    for step in range(1, 8):
        manager.save(model, step=step)
    assert _steps(manager) == [4, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoints.lock", INDEX, "ckpt-4", "ckpt-6", "ckpt-7"]


def test_retention_by_best_metric_keeps_the_best_and_the_latest(tmp_path, model):
    manager = distsave.CheckpointManager(tmp_path, max_to_keep=2, monitor="val_accuracy")
    for step, accuracy in enumerate([0.5, 0.9, 0.7, 0.8, 0.6]):
        manager.save(model, step=step, metrics={"val_accuracy": accuracy})
    assert _steps(manager) == [1, 3, 4]  # the two best (0.9, 0.8) and the newest
    by_fn = distsave.CheckpointManager(tmp_path / "fn", max_to_keep=1, best_fn=lambda m: -m["loss"], mode="max")
    for step, loss in enumerate([3.0, 1.0, 2.0]):
        by_fn.save(model, step=step, metrics={"loss": loss})
    assert _steps(by_fn) == [1, 2]


def test_restore_latest_or_a_step_into_a_model_or_as_a_new_one(tmp_path, model, small_train):
    manager = distsave.CheckpointManager(tmp_path)
    manager.save(model, step=0)
    model.fit(small_train.take(2), epochs=1, verbose=0)
    manager.save(model)
    x = torch.rand(4, 1, 28, 28)
    assert manager.latest.step == 2 and torch.equal(manager.restore().predict(x), model.predict(x))
    fresh = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    trained = model.predict(x)
    manager.restore(fresh)
    assert torch.equal(fresh.predict(x), trained) and fresh.step == 2
    assert fresh.optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    manager.restore(fresh, step=0)
    assert fresh.step == 0 and not torch.equal(fresh.predict(x), trained)
    with pytest.raises(distsave.ArtifactError, match=r"No checkpoint of step 5.*Available steps: \[0, 2\]"):
        manager.restore(step=5)


def test_a_save_that_fails_before_the_index_leaves_latest_at_the_previous_checkpoint(tmp_path, model, monkeypatch):
    manager = distsave.CheckpointManager(tmp_path, max_to_keep=1)
    manager.save(model, step=1)

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_manager, "_replace_file", full_disk)
    with pytest.raises(distsave.SaveError, match="could not be listed"):
        manager.save(model, step=2)
    assert manager.latest.step == 1
    read_manifest(manager.latest.path)
    monkeypatch.undo()
    manager.save(model, step=3)  # the unlisted ckpt-2 of the failed save is cleared
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [INDEX, "ckpt-3"]


def test_index_replaced_in_place_would_be_seen_half_written(tmp_path, model, monkeypatch):
    """The guard: a reader never sees a partial index because it is renamed into place."""
    manager = distsave.CheckpointManager(tmp_path)
    manager.save(model, step=1)
    seen = []
    original = checkpoint_manager._replace_file

    def watching(path, data):
        seen.append(json.loads(path.read_text()))  # readers during the write see the old index whole
        original(path, data)
    monkeypatch.setattr(checkpoint_manager, "_replace_file", watching)
    manager.save(model, step=2)
    assert [e["step"] for e in seen[0]["checkpoints"]] == [1]


@pytest.mark.parametrize("edit", [
    lambda index: index["checkpoints"][0].update(step="../../etc"),
    lambda index: index.update(format="other"),
    lambda index: index["checkpoints"].append(dict(index["checkpoints"][0])),
    lambda index: index["checkpoints"][0].update(metrics={"loss": "high"}),
])
def test_a_damaged_index_is_refused_with_the_field_named(tmp_path, model, edit):
    manager = distsave.CheckpointManager(tmp_path)
    manager.save(model, step=1)
    index = json.loads((tmp_path / INDEX).read_text())
    edit(index)
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(distsave.ArtifactError, match="field '"):
        manager.restore()


def test_two_processes_saving_into_one_folder_never_corrupt_the_index(tmp_path):
    script = str(SCRIPTS / "save_checkpoints.py")
    savers = [subprocess.Popen([sys.executable, script, str(tmp_path), str(first), "40"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True) for first in (0, 1)]
    for saver in savers:
        assert saver.wait(timeout=300) == 0, saver.stderr.read()
    manager = distsave.CheckpointManager(tmp_path, max_to_keep=3)
    assert _steps(manager) == [37, 38, 39]  # the three newest of both, whoever saved last
    for checkpoint in manager.checkpoints:
        loaded = distsave.load_model(checkpoint.path)
        assert all(torch.all(p == checkpoint.step) for p in loaded.parameters())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        INDEX, "ckpt-37", "ckpt-38", "ckpt-39"]


def test_settings_out_of_range_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        distsave.CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="monitor= or best_fn="):
        distsave.CheckpointManager(tmp_path, monitor="loss", best_fn=lambda m: 0.0)
    with pytest.raises(ValueError, match="checkpoint_name"):
        distsave.CheckpointManager(tmp_path, checkpoint_name="../x")


