"""Artifacts to serve, and `distsave serve` started as a real process on a free port."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import distsave
from distsave.demo import workflow_cnn
from distsave.saved_model import Signature

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
IMAGE = distsave.TensorSpec((None, 1, 28, 28), name="x")


def cnn(seed: int = 0) -> distsave.Sequential:
    torch.manual_seed(seed)
    return distsave.Sequential(workflow_cnn(), input_spec=IMAGE)


def save_served_model(model: distsave.Sequential, path: Path) -> Path:
    """``serving_default``, a two-output signature and a two-input one."""
    def embed(x):
        for layer in model.layers[:-1]:
            x = layer(x)
        return x

    def both(x):
        return {"logits": model(x), "embedding": embed(x)}

    def pair(a, b):
        return a * 2 + b

    vectors = [distsave.TensorSpec((None, 3), name="a"), distsave.TensorSpec((None, 3), name="b")]
    distsave.saved_model.save(model, path, signatures={
        "serving_default": model, "both": Signature(both, input_spec=[IMAGE]),
        "pair": Signature(pair, input_spec=vectors, output_names=["sum"])})
    return path


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory) -> Path:
    return save_served_model(cnn(), tmp_path_factory.mktemp("serving") / "model")


@pytest.fixture(scope="session")
def loaded(served_artifact) -> distsave.saved_model.LoadedModel:
    return distsave.saved_model.load(served_artifact)


class ServerProcess:
    """A running ``distsave serve``; ``url`` is ``http://host:port``."""

    def __init__(self, process: subprocess.Popen, url: str, stderr: Path):
        self.process, self.url, self.stderr = process, url, stderr

    def model_url(self, name: str = "mnist") -> str:
        return f"{self.url}/v1/models/{name}"


def _first_line(process: subprocess.Popen, timeout: float) -> str | None:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return None


def run_serve(path: str | Path, *args: str, env: dict | None = None,
              tmp: Path) -> subprocess.Popen:
    stderr = open(tmp / "serve.stderr", "w")
    return subprocess.Popen([sys.executable, "-m", "distsave.cli", "serve", str(path), *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@contextmanager
def serving(path: str | Path, *args: str, tmp: Path, env: dict | None = None,
            timeout: float = 180) -> Iterator[ServerProcess]:
    """Start ``distsave serve PATH --port 0 ARGS`` and stop it (SIGTERM) afterwards."""
    process = run_serve(path, "--name", "mnist", "--port", "0", *args, env=env, tmp=tmp)
    try:
        line = _first_line(process, timeout)
        if not line or " at http://" not in line:
            process.kill()
            process.wait()
            raise AssertionError(f"distsave serve did not start (stdout {line!r}):\n"
                                 + (tmp / "serve.stderr").read_text()[-5000:])
        url = line.split(" at ", 1)[1].split("/v1/", 1)[0]
        yield ServerProcess(process, url, tmp / "serve.stderr")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(served_artifact, tmp_path_factory) -> Iterator[ServerProcess]:
    """The artifact served with dynamic batching (up to 64 rows within 5 ms)."""
    with serving(served_artifact, "--max-batch-size", "64", "--batch-timeout-ms", "5",
                 "--max-body-bytes", "2000000", tmp=tmp_path_factory.mktemp("server")) as running:
        yield running


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
