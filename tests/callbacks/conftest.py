"""Fixtures of the callback and checkpoint tests: a tiny model, saved without its program."""

import pytest

from tests.conftest import tiny_model

import distsave


@pytest.fixture
def model():
    return tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))


@pytest.fixture(autouse=True)
def no_programs(monkeypatch):
    """The serving program is the model_format tests' business; skip its export here."""
    monkeypatch.setattr(distsave.saving.model_format, "_export_serving",
                        lambda *args: distsave.saving.signatures.ExportedSignatures({}))
