import pytest
import torch

import distsave
from distsave.strategies import parse_device


@pytest.mark.parametrize("spec", ["cpu", "/cpu:0", "/CPU:0", "/job:localhost/replica:0/task:0/device:CPU:0"])
def test_cpu_spellings(spec):
    assert parse_device(spec) == torch.device("cpu")


@pytest.mark.parametrize("spec, index", [("/gpu:0", 0), ("/GPU:3", 3), ("/gpu", 0), ("gpu:2", 2),
                                         ("/device:GPU:1", 1), ("/job:worker/replica:0/task:1/device:GPU:2", 2),
                                         ("cuda:5", 5), ("cuda", 0)])
def test_gpu_spellings_name_cuda_devices(spec, index):
    assert parse_device(spec, must_exist=False) == torch.device("cuda", index)


def test_an_existing_gpu_is_accepted_and_numbered(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_device("/gpu:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"'/gpu:4' does not exist: this machine has 4 CUDA.*'cuda:3'"):
        parse_device("/gpu:4")


@pytest.mark.parametrize("spec", ["/gpu:-1", "/gpu:a", "gpu0", "/tpu:0", "/gpu:0/extra", ""])
def test_malformed_gpu_names(spec):
    with pytest.raises(ValueError, match="Expected a device"):
        parse_device(spec, must_exist=False)


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
