"""Names a TensorFlow user reaches for, with Keras' semantics."""

import pytest
import torch
from torch import nn

import distsave


def small() -> distsave.Sequential:
    model = distsave.Sequential([nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_save_weights_then_load_weights_restores_every_tensor(tmp_path):
    torch.manual_seed(0)
    source = small()
    source.save_weights(tmp_path / "w.safetensors")
    torch.manual_seed(1)
    target = small()
    target.load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_load_weights_lists_every_mismatch_and_changes_nothing(tmp_path):
    small().save_weights(tmp_path / "w.safetensors")
    other = distsave.Sequential([nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2)])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing '3.weight'.*'0.weight': file torch.float32\[4, 3\], "
                                         r"model torch.float32\[5, 3\]"):
        other.load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_experimental_local_results_gives_this_processs_values():
    assert distsave.OneDeviceStrategy("cpu").experimental_local_results(3) == (3,)
