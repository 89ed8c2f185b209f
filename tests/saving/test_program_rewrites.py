"""A loaded program's conv -> relu -> max-pool blocks run fused: the same outputs (bit for bit
without the convolution), gradients through a trainable program, only where the pooling's
indices are unused, and a model holding the program records the operators as written."""

import pytest
import torch
from torch import nn

import distsave
from distsave.saving.program_rewrites import conv_relu_max_pool, relu_max_pool


def _calls(signature) -> list:
    return [node.target for node in signature.module.graph.nodes if node.op == "call_function"]


def _saved(tmp_path, layers, shape):
    torch.manual_seed(0)
    model = distsave.Sequential(layers, input_spec=distsave.TensorSpec((None, *shape)))
    distsave.saved_model.save(model, tmp_path / "m")
    return model, distsave.saved_model.load(tmp_path / "m")


def test_a_conv_block_of_a_loaded_program_runs_fused_with_the_models_outputs(tmp_path):
    model, loaded = _saved(tmp_path, [nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(8 * 13 * 13, 10)], (1, 28, 28))
    serving = loaded.signatures["serving_default"]
    calls = _calls(serving)
    assert conv_relu_max_pool in calls and torch.ops.aten.relu.default not in calls
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(serving(x)["output_0"], expected, rtol=1e-5, atol=1e-5)


def test_relu_then_pool_without_a_conv_is_swapped_bit_for_bit_gradients_included(tmp_path):
    model, loaded = _saved(tmp_path, [nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten()], (3, 8, 8))
    serving = loaded.signatures["serving_default"]
    assert relu_max_pool in _calls(serving)
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, :4, :4] = -1.0
    x[1, 1, :2, :2] = 0.5
    x_fused, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = serving(x_fused)["output_0"]
    expected = model(x_eager)
    assert torch.equal(out, expected)
    weights = torch.arange(out.numel(), dtype=torch.float32).view_as(out)
    out.backward(weights)
    expected.backward(weights)
    assert torch.equal(x_fused.grad, x_eager.grad)


def test_a_pooling_whose_indices_are_read_is_left_as_written(tmp_path):
    class PoolAndIndices(nn.Module):
        def forward(self, x):
            values, indices = nn.functional.max_pool2d(torch.relu(x), 2, return_indices=True)
            return values + indices.float()

    _, loaded = _saved(tmp_path, [PoolAndIndices()], (2, 4, 4))
    calls = _calls(loaded.signatures["serving_default"])
    assert torch.ops.aten.relu.default in calls and relu_max_pool not in calls


@pytest.mark.parametrize("save", ["model.save", "saved_model.save"])
def test_a_model_holding_a_fused_program_saves_it_as_written(tmp_path, save):
    """model.save exports a meta rebuild, saved_model.save the live CPU model: either way the
    program records relu before the pooling and no layout changes."""
    _, loaded = _saved(tmp_path, [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()], (1, 10, 10))
    outer = distsave.Sequential([distsave.layers.SavedModelLayer(tmp_path / "m"), nn.Linear(64, 3)],
                                input_spec=distsave.TensorSpec((None, 1, 10, 10)))
    outer.save(tmp_path / "outer") if save == "model.save" else distsave.saved_model.save(outer, tmp_path / "outer")
    again = distsave.saved_model.load(tmp_path / "outer")
    x = torch.randn(2, 1, 10, 10)
    torch.testing.assert_close(again.signatures["serving_default"](x)["output_0"], outer(x),
                               rtol=1e-5, atol=1e-5)
    program = (tmp_path / "outer" / "signatures" / "serving_default.json").read_text()
    assert program.index("aten.relu.default") < program.index("aten.max_pool2d_with_indices.default")
    assert "channels_last" not in program and "memory_format" not in program.replace('"memory_format": null', "")
