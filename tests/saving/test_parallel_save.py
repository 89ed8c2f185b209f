"""Several replicas write one artifact together (real processes, gloo).

Two Mirrored CPU replicas save a model with 4 KiB hash chunks (tests/scripts/parallel_save.py):
each replica writes its share of the chunks, and the artifact equals, byte for byte, the one a
single writer makes of the same model.
"""

import json

import torch
from torch import nn

import distsave
from tests.conftest import run_script


def test_two_replicas_write_disjoint_parts_of_the_single_writer_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr("distsave.saving.format.HASH_CHUNK_BYTES", 4096)  # as the script wrote them
    run_script("parallel_save.py", str(tmp_path), timeout=300)
    together, alone = tmp_path / "together", tmp_path / "alone"
    files_together = distsave.saving.read_manifest(together)["files"]
    files_alone = distsave.saving.read_manifest(alone)["files"]
    tensor_files = sorted(name for name in files_alone if "safetensors" in name)
    assert len(tensor_files) > 3  # weights and optimizer state, in shards
    for name in tensor_files:
        assert (together / name).read_bytes() == (alone / name).read_bytes(), name
        assert files_together[name] == files_alone[name], name
        assert "chunk_starts" not in files_together[name]  # whole grid chunks: a plain record
    written = [json.loads((tmp_path / f"bytes.{rank}.json").read_text()) for rank in (0, 1)]
    data_bytes = sum(files_alone[name]["bytes"] for name in tensor_files if name.endswith(".safetensors"))
    assert min(written) > 0, f"one replica wrote nothing: {written}"
    assert sum(written) == data_bytes  # every byte written once, by one replica


def test_a_replica_killed_while_writing_fails_the_save_and_keeps_the_previous_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr("distsave.saving.format.HASH_CHUNK_BYTES", 4096)
    artifact = tmp_path / "m"
    result = run_script("replica_dies_mid_save.py", str(artifact), timeout=300, check=False)
    assert result.returncode != 0
    assert "SAVE FAILED: SaveError" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "replica(s) [1] stopped responding" in result.stdout
    assert "previous artifact is intact" in result.stdout
    torch.manual_seed(0)
    first = distsave.Sequential([nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)])
    loaded = distsave.load_model(artifact)
    for key, value in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
