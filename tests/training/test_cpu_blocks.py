"""Conv -> ReLU -> max-pool runs of plain Sequentials, fused on a CPU: the same values and
gradients (bit for bit without the convolution, within float32 rounding with it), only where
nothing could notice, and each Sequential's own forward back afterwards."""

import copy

import pytest
import torch
from torch import nn

import distsave
from distsave.training import cpu_blocks
from distsave.training.cpu_blocks import channels_last_blocks


def _awkward_input() -> torch.Tensor:
    """Negative windows, windows tied at zero after ReLU, positive ties, and plain values."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, :4, :4] = -1.0  # every window negative
    x[0, 1, :2, :2] = torch.tensor([[-2.0, 0.0], [0.0, -1.0]])  # zeros tie with clamped negatives
    x[1, 2, :2, :2] = 0.5  # a positive tie: the first element must win
    return x


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1)], ids=["2x2", "3x3-s2-p1"])
def test_relu_then_pool_run_as_pool_then_relu_gives_the_same_values_and_gradients_bit_for_bit(pool):
    model = nn.Sequential(nn.ReLU(), pool)
    x = _awkward_input().requires_grad_()
    expected = model(x)
    expected.backward(torch.arange(expected.numel(), dtype=torch.float32).view_as(expected))
    expected_grad, x.grad = x.grad, None
    with channels_last_blocks(model):
        assert cpu_blocks._PLAN in model.__dict__
        out = model(x)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out))
    assert torch.equal(out, expected) and out.is_contiguous()
    assert torch.equal(x.grad, expected_grad)
    assert "forward" not in model.__dict__ and cpu_blocks._PLAN not in model.__dict__


def test_a_conv_block_runs_channels_last_and_matches_within_float32_rounding():
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 4)])
    x = _awkward_input().requires_grad_()
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    with channels_last_blocks(model):
        out = model(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    weight = model.layers[0].weight
    assert weight.is_contiguous() and weight.grad.stride() == weight.stride()  # parameters keep their layout


def test_only_runs_nothing_could_notice_are_fused():
    hooked = nn.ReLU()
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    plain = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    model = nn.Sequential(nn.Sequential(hooked, nn.MaxPool2d(2)), Custom(nn.ReLU(), nn.MaxPool2d(2)),
                          nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True)), plain)
    with channels_last_blocks(model):
        patched = [m for m in model.modules() if cpu_blocks._PLAN in m.__dict__]
        plain(torch.randn(1, 1, 4, 4))
        model[0](torch.randn(1, 1, 4, 4))
    assert patched == [plain]
    assert calls == [1]  # the hooked ReLU ran as a module


def test_a_copy_made_inside_runs_its_own_layers_and_exports_record_the_layers_as_written():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(2, 1, 8, 8)
    with channels_last_blocks(model):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin[0].bias.add_(100.0)
        assert not torch.allclose(twin(x), model(x))
        program = torch.export.export(model, (x,))
    order = [node.target.__name__ for node in program.graph.nodes if node.op == "call_function"]
    assert order.index("relu.default") < order.index("max_pool2d.default")
