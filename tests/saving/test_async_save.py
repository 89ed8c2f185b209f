"""model.save(path, blocking=False): returns after the host copy, writes in the background,
one save in flight at a time, errors surface on the next save or wait, exit waits, and a kill
mid-write leaves the previous artifact."""

import signal

import pytest
import torch
from torch import nn

from tests.conftest import run_python, run_script, tiny_model

import distsave
from distsave import SaveError
from distsave.saving.manifest import read_manifest

SPEC = distsave.TensorSpec((None, 1, 28, 28))


@pytest.fixture
def export_here(monkeypatch):
    """Export on this thread, not in a helper process: for tests of other guarantees, a few
    seconds each on a 2-core machine (the helper tests below cover that path)."""
    from distsave.saving import model_format

    monkeypatch.setattr(model_format, "helper_modules", lambda architecture: None)


def test_async_save_holds_the_weights_of_the_moment_it_was_called(export_here, tmp_path, monkeypatch):
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


def test_a_background_failure_surfaces_on_the_next_save(export_here, tmp_path):
    model = tiny_model(input_spec=SPEC)
    (tmp_path / "file").write_text("x")
    handle = model.save(tmp_path / "file" / "m", blocking=False)  # its parent is a file
    with pytest.raises(SaveError, match="is a file"):
        model.save(tmp_path / "ok", blocking=False)
    handle.result()  # already reported once
    model.save(tmp_path / "ok", blocking=False).result()
    read_manifest(tmp_path / "ok")


@distsave.register_serializable(package="tests_async")
class Halves(nn.Module):
    """A registered layer from an importable module: a helper process can rebuild it."""

    def forward(self, x):
        return x * 0.5


@distsave.register_serializable(package="tests_async")
class KeepsATensor(nn.Module):
    """A plain tensor attribute: on ``meta`` it has no value, so only this process can export it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.tensor(3.0)

    def forward(self, x):
        return x * self.scale


@distsave.register_serializable(package="tests_async")
class BranchesOnValues(nn.Module):
    """Data-dependent control flow: torch.export refuses it, in any process."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def _exports_on_this_thread(monkeypatch) -> list[str]:
    from distsave.saving import signatures

    calls, export = [], signatures.export_program

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return export(*args, **kwargs)

    monkeypatch.setattr(signatures, "export_program", counted)
    return calls


def test_a_first_background_save_leaves_the_export_to_a_helper_process(tmp_path, monkeypatch):
    """torch.export (1-2 s on a process's first save) would pause training; a helper process
    rebuilds the model from its architecture and exports it, and the save returns at once. The
    program it sends is checked and serves the same outputs."""
    calls = _exports_on_this_thread(monkeypatch)
    model = distsave.Sequential([nn.Flatten(), nn.Linear(784, 16), Halves(), nn.Linear(16, 10)], input_spec=SPEC)
    x = torch.rand(4, 1, 28, 28)
    handle = model.save(tmp_path / "m", blocking=False)
    assert calls == []
    handle.result()
    assert calls == []
    served = distsave.saved_model.load(tmp_path / "m").signatures["serving_default"](x)
    assert torch.equal(next(iter(served.values())), model.predict(x))
    model.save(tmp_path / "again", blocking=False).result()  # the helper's program is reused
    model.save(tmp_path / "blocking")
    assert calls == []
    assert ((tmp_path / "m/signatures/serving_default.json").read_bytes()
            == (tmp_path / "blocking/signatures/serving_default.json").read_bytes())


def test_a_model_a_helper_cannot_rebuild_is_exported_before_the_save_returns(tmp_path, monkeypatch):
    calls = _exports_on_this_thread(monkeypatch)
    model = distsave.Sequential([nn.Flatten(), KeepsATensor()], input_spec=SPEC)
    x = torch.rand(2, 1, 28, 28)
    handle = model.save(tmp_path / "m", blocking=False)
    assert calls  # on this thread, before it returned
    handle.result()
    served = distsave.saved_model.load(tmp_path / "m").signatures["serving_default"](x)
    assert torch.equal(next(iter(served.values())), model.predict(x))


def test_a_helper_export_failure_surfaces_with_its_reason_and_keeps_the_old_artifact(tmp_path):
    target = tmp_path / "m"
    tiny_model(input_spec=SPEC).save(target)
    before = (target / "manifest.json").read_bytes()
    model = distsave.Sequential([nn.Flatten(), BranchesOnValues()], input_spec=SPEC)
    handle = model.save(target, blocking=False)
    with pytest.raises(SaveError, match="Could not export .*torch.export"):
        handle.result()
    assert (target / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("helper, message", [
    ("import json, sys; sys.stdin.read(); print(json.dumps({'programs': {'serving_default': "
     "[{'graph_module': {'graph': {'nodes': [{'target': 'torch.ops.aten.from_file.default'}]}}}, "
     "{'program': 'signatures/serving_default.json'}]}}))",
     "could not be loaded safely again"),
    ("import sys; sys.stdin.read(); print('torch died', file=sys.stderr); sys.exit(3)", "exited with code 3.*torch died"),
    ("import json, sys; sys.stdin.read(); print(json.dumps({'programs': {'serving_default': "
     "[{}, {'program': '../../escape.json'}]}}))", "named its file '../../escape.json'"),
])
def test_what_a_helper_sends_back_is_checked_like_a_file(tmp_path, monkeypatch, helper, message):
    from distsave.saving import export_process

    monkeypatch.setattr(export_process, "_HELPER", helper)
    handle = tiny_model(input_spec=SPEC).save(tmp_path / "m", blocking=False)
    with pytest.raises(SaveError, match=message):
        handle.result()
    assert not (tmp_path / "m").exists() and not (tmp_path.parent / "escape.json").exists()


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
