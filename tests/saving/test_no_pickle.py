"""The README's promise "torch.export.load and pickle are never used": every kind of artifact
loads with those entry points made to raise."""

import pickle

import pytest
import torch
import torch.export

from tests.conftest import tiny_model

import distsave
from distsave.layers import SavedModelLayer

FORBIDDEN = [(torch.export, "load"), (torch, "load"), (pickle, "load"), (pickle, "loads"),
             (pickle, "Unpickler")]


@pytest.fixture
def forbidden(monkeypatch):
    """Make each forbidden loader raise; yields the list of ones that were called anyway."""
    called = []

    def refuse(name):
        def raising(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} was called during a distsave load")
        return raising

    def install():
        for module, name in FORBIDDEN:
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return install, called


@pytest.fixture
def artifacts(trained, exported_with_embed, tmp_path):
    """One artifact of each kind: model.save (with optimizer), saved_model.save (two signatures),
    and a model holding a SavedModelLayer."""
    trained.save(tmp_path / "model")
    outer = distsave.Sequential([SavedModelLayer(distsave.saved_model.load(exported_with_embed), signature="embed"),
                                 torch.nn.Linear(64, 10)])
    outer.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    outer.fit(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), batch_size=4, verbose=0)
    outer.save(tmp_path / "with_layer")
    return {"model": tmp_path / "model", "saved_model": exported_with_embed, "with_layer": tmp_path / "with_layer"}


def test_no_artifact_kind_loads_through_pickle_or_torch_export_load(artifacts, forbidden):
    install, called = forbidden
    x = torch.rand(2, 1, 28, 28)
    install()
    for name, path in artifacts.items():
        model = distsave.load_model(path) if name != "saved_model" else None
        loaded = distsave.saved_model.load(path)
        for signature in loaded.signatures.values():
            signature(x)
        if model is not None:
            model.predict(x)
    assert called == []


def test_the_guard_sees_a_pickle_load(tmp_path, forbidden):
    """The fixture really intercepts: a load that does use torch.load is caught."""
    install, called = forbidden
    torch.save(tiny_model().state_dict(), tmp_path / "w.pt")
    install()
    with pytest.raises(AssertionError, match="torch.load was called"):
        torch.load(tmp_path / "w.pt")
    assert called == ["torch.load"]
