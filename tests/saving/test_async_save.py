"""model.save(path, blocking=False): returns after the host copy, writes in the background,
one save in flight at a time, errors surface on the next save or wait, exit waits, and a kill
mid-write leaves the previous artifact."""

import signal

import pytest
import torch

from tests.conftest import run_python, run_script, tiny_model

import distsave
from distsave import SaveError
from distsave.saving.manifest import read_manifest

SPEC = distsave.TensorSpec((None, 1, 28, 28))


def test_async_save_holds_the_weights_of_the_moment_it_was_called(tmp_path, monkeypatch):
    """The background write starts only after training changed the weights (an event, not a
    race), so a save that wrote the live tensors would be caught every time."""
    import threading

    from distsave.saving.manifest import ArtifactWriter

    trained_on = threading.Event()
    write = ArtifactWriter.write_tensor_sets

    def after_training_went_on(self, *args, **kwargs):
        assert trained_on.wait(timeout=60)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(ArtifactWriter, "write_tensor_sets", after_training_went_on)
    model = tiny_model(input_spec=SPEC)
    x = torch.rand(4, 1, 28, 28)
    expected = model.predict(x)
    handle = model.save(tmp_path / "m", blocking=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the file is written
    trained_on.set()
    handle.result()
    assert handle.done()
    assert torch.equal(distsave.load_model(tmp_path / "m").predict(x), expected)


def test_ten_back_to_back_async_saves_all_verify(tmp_path):
    model = tiny_model(input_spec=SPEC)
    for i in range(10):
        with torch.no_grad():
            model.layers[1].bias.fill_(i)
        model.save(tmp_path / f"m{i % 3}", blocking=False)
    distsave.wait_for_saves()
    for i in range(3):
        read_manifest(tmp_path / f"m{i}")
    assert distsave.load_model(tmp_path / "m0").layers[1].bias.eq(9).all()


def test_a_background_failure_surfaces_on_the_next_save(tmp_path):
    model = tiny_model(input_spec=SPEC)
    (tmp_path / "file").write_text("x")
    handle = model.save(tmp_path / "file" / "m", blocking=False)  # its parent is a file
    with pytest.raises(SaveError, match="is a file"):
        model.save(tmp_path / "ok", blocking=False)
    handle.result()  # already reported once
    model.save(tmp_path / "ok", blocking=False).result()
    read_manifest(tmp_path / "ok")


def test_interpreter_exit_waits_for_a_save_in_flight(tmp_path):
    code = ("import distsave, torch; from torch import nn;"
            "m = distsave.Sequential([nn.Linear(2048, 2048), nn.Linear(2048, 2048)],"
            " input_spec=distsave.TensorSpec((None, 2048)));"  # 32 MiB: several chunks, several threads
            f"m.save({str(tmp_path / 'm')!r}, blocking=False)")
    run_python(["-c", code], timeout=120)
    read_manifest(tmp_path / "m")


def test_sigkill_during_an_async_write_leaves_the_previous_artifact(tmp_path):
    target = tmp_path / "model"
    old = tiny_model(input_spec=SPEC)
    old.save(target)
    x = torch.rand(4, 1, 28, 28)
    result = run_script("save_and_die.py", str(target), "weights", "--async", timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL
    read_manifest(target)
    assert torch.equal(distsave.load_model(target).predict(x), old.predict(x))
