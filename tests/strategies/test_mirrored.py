"""MirroredStrategy with real processes and gloo: two CPU replicas."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (ROOT, assert_every_weight_moved, cnn_model, read_reports, run_python, run_script,
                            scale, state_of)

import distsave


def test_collectives_across_two_replicas(tmp_path):
    run_script("strategy_ops.py", str(tmp_path / "ops"), timeout=120)
    reports = read_reports(tmp_path / "ops", 2)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["replicas"] == 2
        assert r["sum"] == [3.0, 6.0]
        assert r["mean"] == [1.5, 3.0]
        assert r["sum_over_batch"] == [5.0, 5.0, 5.0]
        assert r["gather"] == [0.0, 1.0, 1.0]
        assert r["broadcast"] == {"chief": 0}
        assert r["threads"] <= max(1, (os.cpu_count() or 1) // 2)  # the replicas share the cores
    # a global batch of 5 is split 3/2, contiguous, as TF splits a global batch
    assert reports[0]["shards"] == [[0, 1, 2], [5, 6, 7]]
    assert reports[1]["shards"] == [[3, 4], [8, 9]]
    assert reports[1]["run"] == [2]


def test_two_replicas_x32_equal_one_replica_x64(tmp_path, mnist):
    run_script("equivalence.py", str(tmp_path / "params"), timeout=300)
    replica0 = load_file(tmp_path / "params.0.safetensors")
    replica1 = load_file(tmp_path / "params.1.safetensors")
    single = cnn_model(optimizer="sgd")
    initial = state_of(single)
    single.fit(mnist["train"].take(512).map(scale).batch(64), epochs=1, verbose=0)
    assert_every_weight_moved(replica0, initial)  # equal because both trained, not because neither did
    assert_every_weight_moved(state_of(single), initial)
    for name, tensor in single.state_dict().items():
        assert torch.equal(replica0[name], replica1[name]), name
        torch.testing.assert_close(replica0[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_example_script_starts_both_replicas(tmp_path, launcher):
    report = tmp_path / "report"
    script = [str(ROOT / "examples/train_mnist.py"), "--epochs", "1", "--train-examples", "2048",
              "--report", str(report)]
    if launcher == "python":
        run_python([*script, "--cpu-replicas", "2"], timeout=300)
    else:
        run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", *script], timeout=300)
    reports = read_reports(report, 2)
    assert {r["replicas"] for r in reports} == {2}
    assert reports[0]["parameters"] == reports[1]["parameters"]
    assert reports[0]["test_accuracy"] > 0.5


def test_a_failing_replica_fails_the_run(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import distsave, sys\n"
        "s = distsave.MirroredStrategy(devices=['cpu', 'cpu'])\n"
        "if s.replica_id == 1:\n"
        "    sys.exit(3)\n"
    )
    result = run_python([str(script)], timeout=120, check=False)
    assert result.returncode != 0
    assert "exited with code 3" in result.stderr


def test_one_cpu_replica_runs_in_process():
    strategy = distsave.MirroredStrategy(devices=["cpu"])
    assert strategy.num_replicas_in_sync == 1 and strategy.is_chief
    assert strategy.reduce("SUM", torch.tensor(2.0)).item() == 2.0
