"""Attack classes: manifest fields of the wrong type or range, paths that leave the artifact or
point at special files, and signature names that are not file names. Checksums are always
recomputed, as an attacker would; every refusal is an ArtifactError (or SaveError) naming the
file and the field."""

import os
import shutil
import time

import pytest
from torch import nn

from tests.conftest import rewrite_manifest, tiny_model

import distsave
from distsave import ArtifactError, SaveError
from distsave.saved_model import Signature
from distsave.saving.checksum import XXH3_128

SPEC = distsave.TensorSpec((None, 1, 28, 28))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "m"
    tiny_model(input_spec=SPEC).save(path)
    return path


@pytest.fixture
def artifact(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "m")
    return tmp_path / "m"


def refused_by_both(artifact, match):
    for load in (distsave.load_model, distsave.saved_model.load):
        with pytest.raises(ArtifactError, match=match):
            load(artifact)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(format_version=True), "format_version"),
    (lambda m: m.update(format_version=-1), "format_version"),
    (lambda m: m.update(format_version="2"), "format_version"),
    (lambda m: m.update(kind="pickle"), "kind"),
    (lambda m: m.update(files=[]), "files"),
    (lambda m: m["files"]["model.safetensors"].update(bytes="10"), "files.model.safetensors.bytes"),
    (lambda m: m["files"]["model.safetensors"].update(xxh3_128="0" * 32), "files.model.safetensors.xxh3_128"),
    (lambda m: m.update(input_spec=[{"shape": [None, -1], "dtype": "float32"}]), r"input_spec\[0\].shape\[1\]"),
    (lambda m: m.update(input_spec=[{"shape": [None, 10**6, 10**6], "dtype": "float32"}]), r"input_spec\[0\].shape"),
    (lambda m: m.update(input_spec=[{"shape": [None, 4], "dtype": "object"}]), r"input_spec\[0\].dtype"),
    (lambda m: m.update(training_state={"epoch": "1", "step": 0}), "training_state.epoch"),
    (lambda m: m["signatures"]["serving_default"].update(program="../elsewhere.json"), "signatures.serving_default.program"),
    (lambda m: m["signatures"]["serving_default"].update(program="/dev/zero"), "signatures.serving_default.program"),
    (lambda m: m["signatures"]["serving_default"]["state"].update({"a;b": "0.weight"}), "signatures.serving_default.state"),
    (lambda m: m["compile"]["optimizer"].update(param_groups="all"), "compile.optimizer.param_groups"),
    (lambda m: m.update(architecture=[1, 2]), "architecture"),
    (lambda m: m["files"]["model.safetensors"].update(bytes=2**70), "files.model.safetensors.xxh3_128"),
    (lambda m: m["files"]["model.safetensors"].update(bytes=2**50), "files.model.safetensors.xxh3_128"),
    (lambda m: m["files"]["model.safetensors"].update(chunk_starts=[5]), "files.model.safetensors.chunk_starts"),
    (lambda m: m["files"]["model.safetensors"].update(chunk_starts=[0, 0]), "files.model.safetensors.chunk_starts"),
    (lambda m: m["files"]["model.safetensors"].update(chunk_starts=[0, 10**12]), "files.model.safetensors.chunk_starts"),
    (lambda m: m["files"]["model.safetensors"].update(chunk_starts=[0, True]), "files.model.safetensors.chunk_starts"),
    (lambda m: m["files"]["model.safetensors"].update(chunk_starts="0"), "files.model.safetensors.chunk_starts"),
    (lambda m: m.update(format_version=2) or m["files"]["model.safetensors"].update(chunk_starts=[0]),
     "files.model.safetensors.chunk_starts"),
])
def test_malformed_field_is_named(artifact, edit, field):
    rewrite_manifest(artifact, edit)
    refused_by_both(artifact, f"manifest.json: field '{field}")


@pytest.mark.parametrize("damage", [lambda d: d[:-1], lambda d: d + "\n", lambda d: d.upper(), lambda d: 64])
def test_a_malformed_manifest_checksum_is_named(artifact, damage):
    import json

    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["manifest_sha256"] = damage(manifest["manifest_sha256"])
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    refused_by_both(artifact, "manifest.json: field 'manifest_sha256' should be a sha256 hex digest")


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_chunks_of_a_file_relisted_with_their_digests_still_check_every_byte(artifact):
    """An attacker may cut a file into other chunks and list their true digests: every byte is
    still read once and checked, and a changed byte is still caught."""
    data = (artifact / "model.safetensors").read_bytes()
    starts = list(range(0, len(data), 997))

    def relist(m):
        ends = starts[1:] + [len(data)]
        m["files"]["model.safetensors"].update(chunk_starts=starts, xxh3_128=[
            XXH3_128.of(data[a:b]) for a, b in zip(starts, ends)])
    rewrite_manifest(artifact, relist)
    distsave.load_model(artifact)
    with open(artifact / "model.safetensors", "r+b") as f:
        f.seek(len(data) - 3)
        f.write(bytes([data[-3] ^ 1]))
    refused_by_both(artifact, "model.safetensors: content changed")


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_manifest_is_refused_without_recursion_error(artifact, depth):
    if depth < 500:  # within what json can write: a sealed manifest, checksums recomputed
        rewrite_manifest(artifact, lambda m: m.update(architecture={"x": nested(depth)}))
    else:  # deeper than Python's own recursion: raw text
        (artifact / "manifest.json").write_text('{"architecture": ' + "[" * depth + "]" * depth + "}")
    refused_by_both(artifact, "nested too deeply|nests deeper than")
    from tests.test_cli import cli

    for command in ("inspect", "verify"):
        result = cli(command, str(artifact), check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_unknown_constructor_argument_becomes_an_artifact_error(artifact):
    rewrite_manifest(artifact, lambda m: m["architecture"]["layers"][1]["config"].update(colour="red"))
    with pytest.raises(ArtifactError, match=r"manifest.json: field 'architecture' could not be rebuilt \(TypeError"):
        distsave.load_model(artifact)


@pytest.mark.parametrize("special", ["symlink_outside", "fifo", "directory", "symlinked_folder"])
def test_special_files_are_refused_without_hanging(artifact, tmp_path, special):
    program = artifact / "signatures/serving_default.json"
    if special == "symlink_outside":
        shutil.move(program, tmp_path / "outside.json")
        os.symlink(tmp_path / "outside.json", program)
    elif special == "fifo":
        program.unlink()
        os.mkfifo(program)
    elif special == "directory":
        program.unlink()
        program.mkdir()
    else:
        shutil.move(artifact / "signatures", tmp_path / "real_signatures")
        os.symlink(tmp_path / "real_signatures", artifact / "signatures")
    started = time.monotonic()
    refused_by_both(artifact, "serving_default.json: (not a regular file|missing)")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("name", ["a/b", "../../x", "my sig", "", ".hidden", "x" * 200])
def test_signature_names_must_be_file_names(tmp_path, name):
    model = tiny_model(input_spec=SPEC)
    with pytest.raises(SaveError, match="Expected a signature name"):
        distsave.saved_model.save(model, tmp_path / "sm", signatures={name: Signature(model)})
    assert not (tmp_path / "sm").exists()
    assert list(tmp_path.iterdir()) == []


def test_unbuilt_subclassed_model_saves_without_signatures(tmp_path):
    @distsave.register_serializable(package="Tests")
    class Lazy(distsave.Model):
        def __init__(self):
            super().__init__()
            self.body = nn.LazyLinear(3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.body(x))

    with pytest.warns(UserWarning, match="without signatures"):
        distsave.saved_model.save(Lazy(), tmp_path / "unbuilt")
    loaded = distsave.saved_model.load(tmp_path / "unbuilt")
    assert loaded.signatures == {}
    assert set(loaded.variables) == {"head.weight", "head.bias"}
    from tests.test_cli import cli

    shown = cli("inspect", str(tmp_path / "unbuilt")).stdout
    assert "saved before it was built" in shown and "signatures: none" in shown
