"""Remote storage against a real S3 API: moto's standalone server, reached through s3fs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

import distsave
from distsave.saving.errors import ArtifactError
from distsave.saving.storage import download_artifact, remote_destination
from tests.conftest import ROOT, tiny_model

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("uvicorn")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """Environment under which s3fs (here and in child processes) talks to the moto server."""
    import fsspec

    env = {**CREDENTIALS, "FSSPEC_S3": json.dumps({"endpoint_url": s3_endpoint})}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    bucket = f"bucket-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    return bucket, env


def test_save_load_and_serve_round_trip_through_s3(s3, tmp_path):
    bucket, env = s3
    model = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    with remote_destination(f"s3://{bucket}/run/model") as local:
        model.save(str(local))
    with remote_destination(f"s3://{bucket}/served/1") as local:
        distsave.saved_model.save(model, local)
    x = torch.rand(3, 1, 28, 28)
    with download_artifact(f"s3://{bucket}/run/model") as local:
        restored = distsave.load_model(local)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)

    from tests.serving.conftest import serving

    with serving(f"s3://{bucket}/served", "--poll-seconds", "0", tmp=tmp_path, env=env) as server:
        answer = httpx.post(server.model_url() + ":predict", json={"instances": x.tolist()})
        status = httpx.get(server.model_url()).json()
    assert status["model_version_status"][0]["version"] == "1"
    torch.testing.assert_close(torch.tensor(answer.json()["predictions"]), model(x), rtol=0, atol=1e-5)


UPLOAD = """
import sys, torch, distsave
from torch import nn
from distsave.saving.storage import remote_destination
torch.manual_seed(int(sys.argv[2]))
model = distsave.Model(nn.Linear(4096, 4096), input_spec=distsave.TensorSpec((None, 4096)))
with remote_destination(sys.argv[1]) as local:
    distsave.saved_model.save(model, local, signatures={})
print("done", flush=True)
"""


def test_a_save_killed_during_upload_leaves_no_manifest_a_reader_trusts(s3):
    bucket, env = s3
    url = f"s3://{bucket}/killed/model"
    run = dict(cwd=ROOT, env={**os.environ, **env}, text=True)
    first = subprocess.run([sys.executable, "-c", UPLOAD, url, "0"], capture_output=True, timeout=600, **run)
    assert first.returncode == 0, first.stderr
    fs = s3fs.S3FileSystem(endpoint_url=json.loads(env["FSSPEC_S3"])["endpoint_url"])
    manifest = f"{bucket}/killed/model/manifest.json"
    assert fs.exists(manifest)
    second = subprocess.Popen([sys.executable, "-c", UPLOAD, url, "1"], stdout=subprocess.PIPE, **run)
    deadline = time.monotonic() + 600
    while fs.exists(manifest):  # the new upload has begun once the old manifest is gone
        fs.invalidate_cache()
        assert second.poll() is None and time.monotonic() < deadline, "upload finished before it was killed"
        time.sleep(0.05)
    second.send_signal(signal.SIGKILL)
    second.wait()
    fs.invalidate_cache()
    assert not fs.exists(manifest)
    with pytest.raises(ArtifactError, match="no manifest.json"), download_artifact(url):
        pass
