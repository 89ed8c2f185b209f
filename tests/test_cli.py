"""The ``distsave`` command line, run as a real process."""

import json

import numpy as np
import torch

from tests.conftest import run_python


def cli(*args, check=True):
    return run_python(["-m", "distsave.cli", *args], timeout=120, check=check)


def test_inspect_shows_architecture_parameters_and_training_state(trained, tmp_path):
    trained.save(tmp_path / "m")
    out = cli("inspect", str(tmp_path / "m")).stdout
    assert "parameters: 347,146" in out
    assert "torch.nn.Conv2d(in_channels=1, out_channels=32, kernel_size=(3, 3), stride=(1, 1)" in out
    assert "training state: epoch 1, step 16" in out
    assert "4 (Linear)" in out and "(None, 64)" in out and "Total params: 347,146" in out  # summary
    assert "loss=SparseCategoricalCrossentropy optimizer=Adam" in out
    assert "serving_default(x: float32[None, 1, 28, 28]) -> {output_0}" in out
    assert "model.safetensors" in out and "0.weight" in out


def test_inspect_json_for_scripts(trained, tmp_path):
    trained.save(tmp_path / "m")
    data = json.loads(cli("inspect", "--json", str(tmp_path / "m")).stdout)
    assert data["manifest"]["parameter_count"] == 347_146
    assert {t["name"] for t in data["tensors"] if t["file"] == "model.safetensors"} == set(trained.state_dict())


def test_verify_passes_and_fails(trained, tmp_path):
    trained.save(tmp_path / "m")
    assert "OK" in cli("verify", str(tmp_path / "m")).stdout
    weights = tmp_path / "m/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    failed = cli("verify", str(tmp_path / "m"), check=False)
    assert failed.returncode == 1 and "model.safetensors: content changed" in failed.stderr


def test_run_prints_signature_outputs(trained, tmp_path):
    trained.save(tmp_path / "m")
    x = torch.rand(2, 1, 28, 28)
    np.save(tmp_path / "x.npy", x.numpy())
    out = cli("run", str(tmp_path / "m"), "--signature", "serving_default", "--input", str(tmp_path / "x.npy"),
              "--output", str(tmp_path / "y.npz")).stdout
    assert "Result for output key output_0:" in out
    assert np.array_equal(np.load(tmp_path / "y.npz")["output_0"], trained.predict(x, batch_size=2).numpy())


def test_run_with_wrong_shape_names_the_spec(trained, tmp_path):
    trained.save(tmp_path / "m")
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), dtype=np.float32))
    result = cli("run", str(tmp_path / "m"), "--input", str(tmp_path / "x.npy"), check=False)
    assert result.returncode != 0 and "expects x: float32[None, 1, 28, 28]" in result.stderr
