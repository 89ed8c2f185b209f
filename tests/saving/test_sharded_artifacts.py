"""ShardedStrategy artifacts (real processes, gloo): saved by every replica's own rows, loaded
under any world size and any strategy (tests/scripts/sharded_roundtrip.py)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distsave
from tests.conftest import run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Sharded x2: 1 epoch, saved, predictions and the next epoch's losses recorded."""
    out = tmp_path_factory.mktemp("sharded")
    run_script("sharded_roundtrip.py", "train", str(out), timeout=300)
    return out


def predictions(out, name):
    (output,) = load_file(out / f"pred.{name}.safetensors").values()  # one output, however named
    return output


def test_the_files_are_ordinary_safetensors_holding_whole_tensors(trained):
    artifact = trained / "model"
    manifest = distsave.saving.read_manifest(artifact)
    assert manifest["trained_under"]["class"] == "ShardedStrategy"
    with safe_open(artifact / "model.safetensors", "pt") as f:
        assert f.get_slice("0.weight").get_shape() == [10, 12]
        assert f.get_slice("2.weight").get_shape() == [7, 10]
    with safe_open(artifact / "optimizer.safetensors", "pt") as f:
        assert f.get_slice("0.weight/exp_avg").get_shape() == [10, 12]
    plain = distsave.load_model(artifact)
    assert plain.predict(torch.zeros(1, 12)).shape == (1, 7)


@pytest.mark.parametrize("args, name", [(("sharded", "3"), "sharded3"), (("sharded", "1"), "sharded1"),
                                        (("mirrored",), "mirrored2"), (("plain",), "one_device")])
def test_loads_under_any_strategy_and_size_with_the_same_predictions(trained, args, name):
    run_script("sharded_roundtrip.py", *args, str(trained), timeout=300)
    expected = predictions(trained, "saved")
    torch.testing.assert_close(predictions(trained, name), expected, rtol=1e-6, atol=1e-6)
    if name == "one_device":
        torch.testing.assert_close(predictions(trained, "no_strategy"), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(predictions(trained, "saved_model"), expected, rtol=1e-6, atol=1e-6)


def test_training_continues_under_three_replicas_as_if_uninterrupted(trained):
    if not (trained / "losses.resumed_sharded3.json").exists():
        run_script("sharded_roundtrip.py", "sharded", "3", str(trained), timeout=300)
    reference = json.loads((trained / "losses.uninterrupted.json").read_text())
    resumed = json.loads((trained / "losses.resumed_sharded3.json").read_text())
    assert len(resumed) == len(reference) == 5
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=0)


def test_bf16_mixed_precision_round_trips(tmp_path):
    run_script("sharded_roundtrip.py", "bf16", str(tmp_path), timeout=300)
    torch.testing.assert_close(predictions(tmp_path, "bf16_loaded"), predictions(tmp_path, "bf16_saved"),
                               rtol=0, atol=0)
