"""Every load validates the manifest and each file; damage is reported naming the file."""

import json
import os

import pytest

from tests.conftest import rewrite_manifest

import distsave
from distsave import ArtifactError


@pytest.fixture
def artifact(trained, tmp_path):
    trained.save(tmp_path / "m")
    return tmp_path / "m"


def flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def replace_with_symlink(path):
    moved = path.rename(path.with_name("elsewhere.bin"))
    os.symlink(moved, path)


@pytest.mark.parametrize("damage, message", [
    (lambda a: flip_byte(a / "model.safetensors"), "model.safetensors: content changed"),
    (lambda a: flip_byte(a / "optimizer.safetensors", 200), "optimizer.safetensors: content changed"),
    (lambda a: flip_byte(a / "signatures/serving_default.json", 50), "serving_default.json: content changed"),
    (lambda a: os.truncate(a / "model.safetensors", 1000), r"model.safetensors: size is 1000 bytes"),
    (lambda a: (a / "optimizer.safetensors").unlink(), "optimizer.safetensors: missing"),
    (lambda a: (a / "notes.txt").write_text("hi"), "notes.txt: not listed in the manifest"),
    (lambda a: replace_with_symlink(a / "model.safetensors"), "model.safetensors: not a regular file"),
])
def test_damaged_file_is_named(artifact, damage, message):
    damage(artifact)
    with pytest.raises(ArtifactError, match=message):
        distsave.load_model(artifact)
    with pytest.raises(ArtifactError, match=message):
        distsave.saved_model.load(artifact)


def test_edited_manifest_is_detected(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["training_state"]["epoch"] = 99
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was modified"):
        distsave.load_model(artifact)


def test_truncated_manifest_is_reported(artifact):
    (artifact / "manifest.json").write_text('{"format": "dist')
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        distsave.load_model(artifact)


def test_every_problem_is_reported_at_once(artifact):
    flip_byte(artifact / "model.safetensors")
    (artifact / "optimizer.safetensors").unlink()
    with pytest.raises(ArtifactError) as error:
        distsave.load_model(artifact)
    assert "model.safetensors: content changed" in str(error.value)
    assert "optimizer.safetensors: missing" in str(error.value)


def test_newer_format_asks_for_an_upgrade(artifact):
    rewrite_manifest(artifact, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="Upgrade distsave"):
        distsave.load_model(artifact)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        distsave.load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        distsave.load_model(tmp_path / "empty")
