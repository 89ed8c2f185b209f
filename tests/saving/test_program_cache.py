"""The program cache: a process that saves an architecture of built-in layers another process
already exported reads its serving program instead of exporting again; what it reads is checked
like a file, and nothing that could differ is ever served from it."""

import json
import os

import pytest
import torch
from torch import nn

from tests.conftest import tiny_model

import distsave
from distsave.saving import export_process, program_cache, signatures
from distsave.saving.architecture import module_spec

SPEC = distsave.TensorSpec((None, 1, 28, 28))
PROGRAM = "signatures/serving_default.json"


def entries() -> list:
    folder = program_cache.cache_folder()
    return sorted(folder.glob("*.json")) if folder else []


def key_of(model: distsave.Model):
    return program_cache.entry_path(module_spec(model), [s.to_json() for s in model.input_spec])


@distsave.register_serializable(package="tests_program_cache")
class Doubles(nn.Module):
    """A layer of the user's: its code may change under the same name."""

    def forward(self, x):
        return x * 2


def test_a_second_process_saving_the_same_architecture_reads_the_program(tmp_path, monkeypatch):
    """A fresh model object stands in for another process: the in-process reuse is per model."""
    tiny_model(input_spec=SPEC).save(tmp_path / "first")
    assert len(entries()) == 1
    monkeypatch.setattr(signatures, "export_program", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setattr(export_process, "_HELPER", "import sys; sys.exit('a helper process was started')")
    model = tiny_model(input_spec=SPEC)
    model.save(tmp_path / "second")
    tiny_model(input_spec=SPEC).save(tmp_path / "background", blocking=False).result()  # no helper
    first = (tmp_path / "first" / PROGRAM).read_bytes()
    assert (tmp_path / "second" / PROGRAM).read_bytes() == first
    assert (tmp_path / "background" / PROGRAM).read_bytes() == first
    x = torch.rand(3, 1, 28, 28)
    served = distsave.saved_model.load(tmp_path / "second").signatures["serving_default"](x)
    assert torch.equal(next(iter(served.values())), model.predict(x))


def test_across_real_processes_the_second_save_reads_what_the_first_exported(tmp_path):
    """The second process cannot export at all (export_program is None there)."""
    from tests.conftest import run_python

    code = ("import sys, distsave; from torch import nn; from distsave.saving import signatures;"
            "m = distsave.Sequential([nn.Flatten(), nn.Linear(784, 8)], input_spec=distsave.TensorSpec((None, 1, 28, 28)));"
            "sys.argv[2] == 'cached' and setattr(signatures, 'export_program', None);"
            "m.save(sys.argv[1])")
    run_python(["-c", code, str(tmp_path / "a"), "cold"], timeout=120)
    run_python(["-c", code, str(tmp_path / "b"), "cached"], timeout=120)
    assert (tmp_path / "a" / PROGRAM).read_bytes() == (tmp_path / "b" / PROGRAM).read_bytes()


HOSTILE = {
    "not JSON": b"\x80\x04 pickle? no",
    "an operator off the allowlist": None,  # filled in from a real entry below
    "a program file outside signatures/": None,
    "no programs": b'{"programs": 3}',
    "larger than any program": b" " * (2 * distsave.saving.format.MAX_PROGRAM_BYTES + 1),
}


@pytest.mark.parametrize("tampering", list(HOSTILE))
def test_a_bad_entry_is_not_served_and_is_replaced(tmp_path, tampering):
    tiny_model(input_spec=SPEC).save(tmp_path / "honest")
    [entry] = entries()
    reply = json.loads(entry.read_text())
    program, manifest_entry = reply["programs"]["serving_default"]
    if tampering == "an operator off the allowlist":
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if "addmm" in n["target"])
        node["target"] = "torch.ops.aten.from_file.default"
        bad = json.dumps(reply).encode()
    elif tampering == "a program file outside signatures/":
        manifest_entry["program"] = "../../escape.json"
        bad = json.dumps(reply).encode()
    else:
        bad = HOSTILE[tampering]
    entry.write_bytes(bad)
    model = tiny_model(input_spec=SPEC)
    model.save(tmp_path / "after")
    assert (tmp_path / "after" / PROGRAM).read_bytes() == (tmp_path / "honest" / PROGRAM).read_bytes()
    assert entry.read_bytes() != bad  # exported again and replaced
    assert not (tmp_path.parent / "escape.json").exists()


def test_a_model_with_a_class_of_the_users_is_never_cached(tmp_path):
    model = distsave.Sequential([nn.Flatten(), Doubles(), nn.Linear(784, 8)], input_spec=SPEC)
    assert key_of(model) is None
    model.save(tmp_path / "m")
    model.save(tmp_path / "background", blocking=False).result()
    assert entries() == []


def test_the_key_changes_with_everything_the_program_depends_on(monkeypatch):
    model = tiny_model(input_spec=SPEC)
    key = key_of(model)
    assert key is not None and key == key_of(tiny_model(input_spec=SPEC))
    assert key_of(tiny_model(input_spec=distsave.TensorSpec((None, 784)))) != key
    assert key_of(distsave.Sequential([nn.Flatten(), nn.Linear(784, 10)], input_spec=SPEC)) != key
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "0.0.1")
        assert key_of(model) != key
    with monkeypatch.context() as patch:
        patch.setattr(program_cache, "_distsave_code_digest", lambda: "edited")
        assert key_of(model) != key
    torch.set_default_dtype(torch.float64)
    try:
        assert key_of(model) != key
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_cache_can_be_turned_off_and_is_private_to_its_user(tmp_path, monkeypatch):
    folder = program_cache.cache_folder()
    assert folder is not None and folder.stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("DISTSAVE_PROGRAM_CACHE", "0")
    tiny_model(input_spec=SPEC).save(tmp_path / "off")
    assert program_cache.cache_folder() is None
    monkeypatch.delenv("DISTSAVE_PROGRAM_CACHE")
    assert entries() == []
    shared = tmp_path / "shared"
    (shared / "programs").mkdir(parents=True)
    os.chmod(shared / "programs", 0o777)
    monkeypatch.setenv("DISTSAVE_CACHE_DIR", str(shared))
    tiny_model(input_spec=SPEC).save(tmp_path / "shared-save")
    assert program_cache.cache_folder() is None and list((shared / "programs").iterdir()) == []


def test_a_cache_that_cannot_be_written_never_fails_a_save(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSAVE_CACHE_DIR", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    tiny_model(input_spec=SPEC).save(tmp_path / "m")
    distsave.load_model(tmp_path / "m")
