"""ONNX export: the exported graph gives the signature's outputs in onnxruntime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distsave
from distsave.export import compare_with_onnxruntime, export_onnx
from distsave.layers import SavedModelLayer
from tests.serving.conftest import IMAGE, cnn, save_served_model

pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")


def test_exported_cnn_and_transfer_model_match_the_signature_in_onnxruntime(tmp_path):
    cnn_dir = save_served_model(cnn(), tmp_path / "cnn")
    torch.manual_seed(0)
    features = SavedModelLayer(distsave.saved_model.load(cnn_dir), signature="serving_default", trainable=True)
    transfer = distsave.Sequential([features, nn.ReLU(), nn.Linear(10, 3)], input_spec=IMAGE)
    distsave.saved_model.save(transfer, tmp_path / "transfer")
    for name in ("cnn", "transfer"):
        out = export_onnx(tmp_path / name, tmp_path / f"{name}.onnx")
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["x"]
        assert session.get_inputs()[0].shape[0] == "batch"  # the batch dimension stays dynamic
        differences = compare_with_onnxruntime(out, tmp_path / name, batch_sizes=(1, 64))
        assert set(differences) == {1, 64} and max(differences.values()) <= 1e-5, differences


def test_two_output_signature_keeps_its_output_names(tmp_path):
    save_served_model(cnn(), tmp_path / "cnn")
    out = export_onnx(tmp_path / "cnn", tmp_path / "both.onnx", signature="both")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    assert max(compare_with_onnxruntime(out, tmp_path / "cnn", signature="both").values()) <= 1e-5


def test_unknown_signature_is_refused_with_the_available_ones(tmp_path):
    save_served_model(cnn(), tmp_path / "cnn")
    with pytest.raises(ValueError, match=r"no signature 'nope'; it has \['both', 'pair', 'serving_default'\]"):
        export_onnx(tmp_path / "cnn", tmp_path / "x.onnx", signature="nope")
