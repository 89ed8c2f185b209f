import pytest
import torch

import distsave
from distsave.strategies import parse_device


@pytest.mark.parametrize("spec", ["cpu", "/cpu:0", "/CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"])
def test_cpu_spellings(spec):
    assert parse_device(spec) == torch.device("cpu")


def test_one_device_strategy_accepts_tf_style_names():
    strategy = distsave.OneDeviceStrategy("/cpu:0")
    assert strategy.device == torch.device("cpu") and strategy.num_replicas_in_sync == 1


@pytest.mark.skipif(torch.cuda.device_count() > 8, reason="needs fewer than 9 GPUs")
def test_a_gpu_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match="'/gpu:8' does not exist"):
        distsave.OneDeviceStrategy("/gpu:8")


def test_malformed_device_string():
    with pytest.raises(ValueError, match="Expected a device"):
        parse_device("tpu:0")


def test_mirrored_refuses_mixing_cpu_and_gpu():
    with pytest.raises(ValueError, match="all be CPUs or all be GPUs"):
        distsave.MirroredStrategy(devices=["cpu", "cuda:0"])


def test_default_strategy_without_scope_and_scope_nesting():
    default = distsave.get_strategy()
    one = distsave.OneDeviceStrategy("cpu")
    with one.scope():
        assert distsave.get_strategy() is one
    assert distsave.get_strategy() is default


def test_multi_worker_strategy_needs_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nnodes"):
        distsave.MultiWorkerMirroredStrategy()
