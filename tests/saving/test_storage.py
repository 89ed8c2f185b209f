"""Remote artifacts through fsspec: upload with the manifest last, download then the verified load."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

import distsave
from distsave.saving.errors import ArtifactError
from distsave.saving.format import MANIFEST
from distsave.saving.storage import (
    download_artifact,
    is_remote,
    local_path,
    remote_destination,
    upload_artifact,
)
from tests.conftest import tiny_model

fsspec = pytest.importorskip("fsspec")
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402


class DyingMemoryFileSystem(MemoryFileSystem):
    """An in-memory store whose uploads die after ``survive`` files (a save killed mid-way)."""

    protocol = "dyingmemory"
    survive = 10**9

    def put_file(self, lpath, rpath, *args, **kwargs):
        if type(self).survive <= 0:
            raise OSError("connection lost")
        type(self).survive -= 1
        return super().put_file(lpath, rpath, *args, **kwargs)


fsspec.register_implementation("dyingmemory", DyingMemoryFileSystem, clobber=True)


@pytest.fixture
def url() -> str:
    return f"memory://bucket/{uuid.uuid4().hex}/model"


def _saved(model, tmp_path, name="local"):
    model.save(str(tmp_path / name))
    return tmp_path / name


def test_is_remote_tells_urls_from_local_paths(tmp_path):
    assert is_remote("s3://bucket/model") and is_remote("memory://x") and is_remote("gs://b/m")
    assert not is_remote(tmp_path) and not is_remote("relative/dir") and not is_remote("file:///tmp/m")
    assert local_path("file:///tmp/m") == local_path("/tmp/m")


def test_upload_then_download_loads_the_same_model(tmp_path, url):
    model = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    with remote_destination(url) as local:
        model.save(str(local))
    x = torch.rand(4, 1, 28, 28)
    with download_artifact(url) as local:
        restored = distsave.load_model(local)
        signature = distsave.saved_model.load(local).signatures["serving_default"]
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(signature(x)["output_0"], model(x), rtol=0, atol=1e-6)
    assert not local.exists()


def test_a_killed_upload_leaves_no_manifest_for_a_reader(tmp_path):
    url = f"dyingmemory://bucket/{uuid.uuid4().hex}/model"
    first = _saved(tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28))), tmp_path, "first")
    upload_artifact(first, url)
    torch.manual_seed(1)
    second = _saved(tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28))), tmp_path, "second")
    DyingMemoryFileSystem.survive = 1  # dies on the second file of the new artifact
    try:
        with pytest.raises(OSError, match="connection lost"):
            upload_artifact(second, url)
    finally:
        DyingMemoryFileSystem.survive = 10**9
    fs = DyingMemoryFileSystem()
    assert not fs.exists(url.removeprefix("dyingmemory://") + "/" + MANIFEST)
    with pytest.raises(ArtifactError, match="has no manifest.json"), download_artifact(url):
        pass


def test_download_refuses_unsafe_names_and_wrong_sizes(tmp_path, url):
    upload_artifact(_saved(tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28))), tmp_path), url)
    fs, root = fsspec.core.url_to_fs(url)
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    manifest["files"]["../../escape.json"] = {"bytes": 2, "xxh3_128": "0"}
    fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="not a plain relative file name"), download_artifact(url):
        pass
    del manifest["files"]["../../escape.json"]
    manifest["files"]["model.safetensors"]["bytes"] = 10
    fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="the manifest says 10"), download_artifact(url):
        pass


def test_download_then_load_still_verifies_checksums(tmp_path, url):
    upload_artifact(_saved(tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28))), tmp_path), url)
    fs, root = fsspec.core.url_to_fs(url)
    data = bytearray(fs.cat_file(f"{root}/model.safetensors"))
    data[-1] ^= 0xFF
    fs.pipe_file(f"{root}/model.safetensors", bytes(data))
    with download_artifact(url) as local, pytest.raises(ArtifactError, match="xxh3_128 does not match"):
        distsave.saved_model.load(local)


def test_both_apis_save_to_and_load_from_a_url(url):
    model = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    x = torch.rand(3, 1, 28, 28)
    model.save(f"{url}/model")
    assert torch.equal(distsave.load_model(f"{url}/model").predict(x), model.predict(x))
    distsave.saved_model.save(model, f"{url}/exported")
    outputs = distsave.saved_model.load(f"{url}/exported").signatures["serving_default"](x)
    assert torch.equal(outputs["output_0"], model.predict(x))
