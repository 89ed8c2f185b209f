"""ShardedStrategy artifacts (real processes, gloo): saved by every replica's own rows, loaded
under any world size and any strategy (tests/scripts/sharded_roundtrip.py)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distsave
from distsave.saving.checksum import XXH3_128
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
    assert len(resumed) == len(reference) == 1
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=0)
    torch.testing.assert_close(predictions(trained, "after.resumed_sharded3"),
                               predictions(trained, "after.uninterrupted"), rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_round_trips(tmp_path):
    run_script("sharded_roundtrip.py", "bf16", str(tmp_path), timeout=300)
    torch.testing.assert_close(predictions(tmp_path, "bf16_loaded"), predictions(tmp_path, "bf16_saved"),
                               rtol=0, atol=0)


def test_a_missing_byte_range_is_refused_on_every_replica_and_async_save_explains(trained, tmp_path):
    """The weights file of a copy loses its last 64 bytes; the manifest is rewritten to match (as
    an attacker would): every replica refuses it, naming the file, and none waits for the others."""
    import shutil

    from tests.conftest import rewrite_manifest

    work = tmp_path / "work"
    shutil.copytree(trained / "model", work / "model")
    shutil.copytree(trained / "model", work / "damaged")
    weights = work / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    rewrite_manifest(work / "damaged", lambda m: m["files"]["model.safetensors"].update(
        bytes=weights.stat().st_size, chunk_starts=[0], xxh3_128=[XXH3_128.of(weights.read_bytes())]))
    result = run_script("sharded_roundtrip.py", "refused", str(work), timeout=300)
    for rank in (0, 1):
        assert f"replica {rank} LOAD REFUSED" in result.stdout, result.stdout
        assert f"replica {rank} ASYNC REFUSED" in result.stdout
    assert "model.safetensors" in result.stdout and "blocking=True" in result.stdout
    distsave.saving.read_manifest(work / "blocking")
