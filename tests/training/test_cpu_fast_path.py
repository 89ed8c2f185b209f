"""The CPU train step: chosen on a CPU unless jit_compile=False, and the same training as the
plain eager step within float32 rounding."""

import pytest
import torch
from torch import nn

import distsave
from tests.conftest import cnn_model

from distsave.training.cpu_step import CpuTrainStep
from distsave.training import cpu_blocks, fast_pool
from distsave.training.fast_pool import FastPooling, fast_max_pool2d
from distsave.training.steps import TrainStep, make_train_step

POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=(2, 3), stride=1, dilation=2, ceil_mode=True)]


@pytest.mark.parametrize("options", POOLS, ids=["2x2", "3x3-s2-p1", "2x3-dilated-ceil"])
def test_fast_pooling_gives_max_pool2d_values_and_gradients_bit_for_bit(options):
    torch.manual_seed(0)
    # ReLU'd and rounded inputs hold many ties: the first maximum of a window must win, as in torch.
    for data in (torch.randn(4, 3, 11, 10), torch.relu(torch.randn(4, 3, 11, 10)).round(), torch.randn(3, 9, 9)):
        plain, fast = data.clone().requires_grad_(), data.clone().requires_grad_()
        pool = nn.MaxPool2d(**options)
        expected = pool(plain)
        with FastPooling():
            result = pool(fast)
        grad = torch.randn_like(expected)
        expected.backward(grad)
        result.backward(grad)
        assert torch.equal(result, expected) and result.is_contiguous()
        assert torch.equal(fast.grad, plain.grad)


def test_fast_pooling_leaves_calls_it_cannot_speed_up_to_torch():
    data = torch.randn(2, 3, 8, 8)
    with FastPooling():
        values, indices = nn.functional.max_pool2d(data, 2, return_indices=True)
    assert torch.equal(indices, nn.functional.max_pool2d(data, 2, return_indices=True)[1])
    channels_last = data.contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast_max_pool2d(channels_last, 2), nn.functional.max_pool2d(data, 2))


def test_a_cpu_gets_the_cpu_step_and_jit_compile_false_the_plain_one():
    model = cnn_model()
    assert type(make_train_step(model, model, model.distribute_strategy, [])) is CpuTrainStep
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", jit_compile=False)
    assert type(make_train_step(model, model, model.distribute_strategy, [])) is TrainStep


def _trained(small_train, jit_compile, optimizer="adam"):
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(200, 10)])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=optimizer, metrics=["accuracy"],
                  jit_compile=jit_compile)
    start = {name: t.clone() for name, t in model.state_dict().items()}
    history = model.fit(small_train, epochs=1, verbose=0)
    return model, history.history, start


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_the_cpu_step_trains_as_the_plain_step_within_float32_rounding(small_train, optimizer, monkeypatch):
    """16 steps each; the fused conv block's and the fast pooling's gradients and the fused
    optimizer's update must match."""
    pooled, blocks = [], []
    monkeypatch.setattr(fast_pool._MaxPool2d, "apply", spy(fast_pool._MaxPool2d.apply, pooled))
    monkeypatch.setattr(cpu_blocks, "_block", spy(cpu_blocks._block, blocks))
    fast, fast_logs, start = _trained(small_train, "auto", optimizer)
    assert len(blocks) == len(pooled) == 16  # conv-ReLU-pool fused, the other pool fast: both ran
    plain, plain_logs, _ = _trained(small_train, False, optimizer)
    assert len(blocks) == len(pooled) == 16
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert (a - start[name]).abs().max() > 1e-4, f"{name} did not train"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert fast_logs["accuracy"] == pytest.approx(plain_logs["accuracy"], abs=1 / 1024)
    assert fast_logs["loss"] == pytest.approx(plain_logs["loss"], rel=1e-4)


def spy(function, calls):
    def counted(*args):
        calls.append(1)
        return function(*args)
    return counted


def test_the_optimizer_is_fused_during_fit_only(small_train):
    seen = []

    class Watch(distsave.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.optimizer.param_groups[0]["fused"])

    model = cnn_model()
    model.fit(small_train.take(2), epochs=1, verbose=0, callbacks=[Watch()])
    assert seen == [True, True]
    assert model.optimizer.param_groups[0]["fused"] is None  # a saved artifact records the user's choice


def test_explicit_optimizer_choices_are_kept(small_train):
    model = cnn_model(optimizer=lambda params: torch.optim.Adam(params, foreach=True))
    model.fit(small_train.take(1), epochs=1, verbose=0)
    assert model.optimizer.param_groups[0]["fused"] is None and model.optimizer.param_groups[0]["foreach"]


def test_the_step_keeps_the_thread_count_its_first_steps_ran_fastest_with(monkeypatch):
    import time as clock

    from distsave.training import cpu_step

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choice = cpu_step._ThreadChoice()

        def step():  # as on a busy machine: two threads wait for each other
            clock.sleep(0.004 if torch.get_num_threads() == 2 else 0.001)

        for _ in range(cpu_step._WARMUP + 2 * cpu_step._TIMED):
            choice.run(step)
        assert torch.get_num_threads() == 1 and not choice.choosing
        choice.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
