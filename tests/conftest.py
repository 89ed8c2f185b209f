"""Shared fixtures: small MNIST pipelines, trained models, and real multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import distsave
from distsave.demo import workflow_cnn

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(autouse=True)
def cpu_default_strategy(request, monkeypatch):
    """Outside tests/gpu, "no strategy" means the CPU even on a machine with a GPU."""
    if "gpu" not in request.path.parts:
        monkeypatch.setattr(distsave.strategies.base, "_default", distsave.OneDeviceStrategy("cpu"))


@pytest.fixture(autouse=True)
def private_program_cache(tmp_path_factory, monkeypatch):
    """Each test (and the processes it starts) gets an empty program cache of its own, never the
    user's: a program another test exported must not stand in for an export a test checks."""
    monkeypatch.setenv("DISTSAVE_CACHE_DIR", str(tmp_path_factory.mktemp("program-cache")))
    monkeypatch.delenv("DISTSAVE_PROGRAM_CACHE", raising=False)


def scale(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image.float() / 255, label


@pytest.fixture(scope="session")
def mnist():
    return distsave.datasets.load("mnist")


@pytest.fixture(scope="session")
def small_train(mnist):
    """1,024 training examples, scaled and cached, in batches of 64, unshuffled."""
    return mnist["train"].take(1024).map(scale).cache().batch(64)


@pytest.fixture(scope="session")
def small_test(mnist):
    return mnist["test"].take(512).map(scale).cache().batch(128)


def cnn_model(optimizer: str = "adam", **kwargs) -> distsave.Sequential:
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn(), **kwargs)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=optimizer, metrics=["accuracy"])
    return model


@pytest.fixture
def trained(small_train) -> distsave.Sequential:
    model = cnn_model()
    model.fit(small_train, epochs=1, verbose=0)
    return model


@pytest.fixture
def exported_with_embed(trained, tmp_path) -> Path:
    """``trained`` saved with ``serving_default`` and an ``embed`` signature (64-d features)."""
    from distsave.saved_model import Signature

    def embed(x):
        for layer in trained.layers[:-1]:
            x = layer(x)
        return x

    distsave.saved_model.save(trained, tmp_path / "sm", signatures={
        "serving_default": trained, "embed": Signature(embed, output_names=["embedding"])})
    return tmp_path / "sm"


def run_python(args: list[str], *, timeout: float = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run a real Python process (which may start replica processes of its own)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=timeout, env=full_env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr[-5000:]}")
    return result


def run_script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_python([str(SCRIPTS / name), *args], **kwargs)


def read_reports(prefix: Path, replicas: int) -> list[dict]:
    return [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(replicas)]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state, to compare before and after training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_every_weight_moved(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """Training really stepped: no tensor of ``state`` is still at its initial value."""
    unchanged = [name for name, tensor in state.items() if torch.equal(tensor.cpu(), initial[name].cpu())]
    assert not unchanged, f"still at their initial values (did the optimizer step?): {unchanged}"


def tiny_model(**kwargs) -> distsave.Sequential:
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)], **kwargs)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def rewrite_manifest(artifact: Path, edit=lambda manifest: None) -> None:
    """Recompute every checksum after tampering, as a careful attacker would."""
    from distsave.saving.format import MANIFEST
    from distsave.saving.manifest import seal_manifest
    from distsave.saving.tensor_io import chunk_digests

    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(artifact).as_posix(): chunk_digests(p.read_bytes()).to_json()
                         for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != MANIFEST}
    edit(manifest)
    (artifact / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))
