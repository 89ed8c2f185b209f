"""Hostile artifacts: checksums recomputed by the attacker, so only our parsing stands guard.
Each is refused with a clear error, and its payload (creating a marker file) never runs."""

import json
import os
import pickle
import struct

import pytest

from tests.conftest import rewrite_manifest

import distsave
from distsave import ArtifactError


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def artifact(trained, tmp_path):
    trained.save(tmp_path / "m")
    return tmp_path / "m"


def both_loaders_refuse(artifact, match):
    for load in (distsave.load_model, distsave.saved_model.load):
        with pytest.raises(ArtifactError, match=match):
            load(artifact)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors",
                                    "signatures/serving_default.json", "manifest.json"])
def test_pickle_payload_in_any_file_never_runs(artifact, tmp_path, victim):
    marker = tmp_path / "pwned"
    (artifact / victim).write_bytes(pickle.dumps(Payload(marker)))
    if victim != "manifest.json":
        rewrite_manifest(artifact)
    refused = 0
    for load in (distsave.load_model, distsave.saved_model.load):
        try:
            load(artifact)  # saved_model.load never reads the optimizer file, load_model no program
        except ArtifactError:
            refused += 1
    assert refused >= 1
    assert not marker.exists()


def test_a_pickle_file_added_and_listed_is_refused(artifact, tmp_path):
    marker = tmp_path / "pwned"
    (artifact / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(artifact)
    both_loaders_refuse(artifact, "files.model.pt' should be a file distsave writes")
    assert not marker.exists()


def test_manifest_path_outside_the_directory(artifact, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    rewrite_manifest(artifact, lambda m: m["files"].update(
        {"../secret.safetensors": {"bytes": 1, "sha256": "0" * 64}}))
    both_loaders_refuse(artifact, "files.../secret.safetensors' should be a file distsave writes")


def test_safetensors_header_claiming_more_bytes_than_the_file_has(artifact):
    header = json.dumps({"0.weight": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
    (artifact / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    rewrite_manifest(artifact)
    both_loaders_refuse(artifact, "model.safetensors is not a valid safetensors file")


def test_graph_with_an_operator_off_the_allowlist(artifact, tmp_path):
    program_file = artifact / "signatures/serving_default.json"
    program = json.loads(program_file.read_text())
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "os.system"
    program_file.write_text(json.dumps(program))
    rewrite_manifest(artifact)
    with pytest.raises(ArtifactError, match="operator 'os.system' is not on the allowlist"):
        distsave.saved_model.load(artifact)


def test_graph_with_a_non_core_aten_operator(artifact):
    program_file = artifact / "signatures/serving_default.json"
    program = json.loads(program_file.read_text())
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten._fused_dropout.default"
    program_file.write_text(json.dumps(program))
    rewrite_manifest(artifact)
    with pytest.raises(ArtifactError, match="_fused_dropout.default' is not on the allowlist"):
        distsave.saved_model.load(artifact)


def test_code_smuggled_into_a_shape_expression_or_guard(artifact, tmp_path):
    marker = tmp_path / "pwned"
    program_file = artifact / "signatures/serving_default.json"
    program = json.loads(program_file.read_text())
    program["range_constraints"][f"__import__('os').system('touch {marker}')"] = {"min_val": 1, "max_val": None}
    program["guards_code"] = [f"__import__('os').system('touch {marker}')"]
    program_file.write_text(json.dumps(program))
    rewrite_manifest(artifact)
    with pytest.raises(ArtifactError) as error:
        distsave.saved_model.load(artifact)
    assert "guard code" in str(error.value) and "not plain shape arithmetic" in str(error.value)
    assert not marker.exists()
