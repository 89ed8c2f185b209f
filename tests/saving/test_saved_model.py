import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import run_python, run_script, tiny_model

import distsave
from distsave import SaveError


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_serving_default_equals_predict_exactly_and_the_eager_model_within_rounding(trained, tmp_path, batch,
                                                                                   small_test):
    """On a CPU, predict and a loaded program both run conv -> ReLU -> pool channels-last
    (training/cpu_blocks.py, saving/program_rewrites.py): bit for bit the same; the eager call
    runs channels-first, so its convolution rounds differently."""
    distsave.saved_model.save(trained, tmp_path / "sm")
    loaded = distsave.saved_model.load(tmp_path / "sm")
    images = next(iter(small_test))[0][:batch]
    expected = trained.predict(images, batch_size=batch)
    assert torch.equal(loaded.signatures["serving_default"](images)["output_0"], expected)
    assert torch.equal(loaded.signatures["serving_default"](x=images)["output_0"], expected)
    with torch.no_grad():
        torch.testing.assert_close(expected, trained(images), rtol=1e-5, atol=1e-5)


def test_load_in_a_fresh_process_without_the_users_code(trained, tmp_path, small_test):
    distsave.saved_model.save(trained, tmp_path / "sm", output_names=["logits"])
    images = next(iter(small_test))[0][:5]
    np.save(tmp_path / "x.npy", images.numpy())
    code = ("import sys, numpy as np, torch, distsave\n"
            "with distsave.OneDeviceStrategy('cpu').scope():\n"
            "    loaded = distsave.saved_model.load(sys.argv[1])\n"
            "out = loaded.signatures['serving_default'](torch.from_numpy(np.load(sys.argv[2])))\n"
            "np.save(sys.argv[3], out['logits'].cpu().numpy())\n")
    run_python(["-c", code, str(tmp_path / "sm"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")])
    assert np.array_equal(np.load(tmp_path / "y.npy"), trained.predict(images, batch_size=5).numpy())


def test_several_signatures_share_one_copy_of_the_weights(trained, exported_with_embed):
    loaded = distsave.saved_model.load(exported_with_embed)
    assert sorted(loaded.signatures) == ["embed", "serving_default"]
    assert sorted(p.name for p in exported_with_embed.glob("*.safetensors")) == ["model.safetensors"]
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        features = x
        for layer in trained.layers[:-1]:
            features = layer(features)
        torch.testing.assert_close(loaded.signatures["embed"](x)["embedding"], features, rtol=1e-5, atol=1e-5)
    first = loaded.signatures["serving_default"].module.get_parameter("0.weight")
    assert first is loaded.signatures["embed"].module.get_parameter("root.0.weight")
    assert first is loaded.variables["0.weight"]


def test_wrong_inputs_name_the_signature_and_spec(trained, tmp_path):
    distsave.saved_model.save(trained, tmp_path / "sm")
    serve = distsave.saved_model.load(tmp_path / "sm").signatures["serving_default"]
    with pytest.raises(ValueError, match=r"'serving_default' expects x: float32\[None, 1, 28, 28\]; received float32\[2, 28, 28\]"):
        serve(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match=r"received uint8\[2, 1, 28, 28\]"):
        serve(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="has no input 'images'"):
        serve(images=torch.zeros(2, 1, 28, 28))


def test_plain_module_with_example_inputs_and_dict_outputs(tmp_path):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, a, b):
            return {"sum": self.linear(a) + b, "diff": self.linear(a) - b}

    module = TwoOutputs()
    distsave.saved_model.save(module, tmp_path / "sm", example_inputs=(torch.zeros(2, 3), torch.zeros(2, 2)))
    serve = distsave.saved_model.load(tmp_path / "sm").signatures["serving_default"]
    a, b = torch.randn(5, 3), torch.randn(5, 2)
    out = serve(input_0=a, input_1=b)
    assert sorted(out) == ["diff", "sum"]
    with torch.no_grad():
        assert torch.equal(out["sum"], module(a, b)["sum"])


def test_model_without_inputs_saves_weights_only_then_signatures(tmp_path):
    model = tiny_model()
    distsave.saved_model.save(model, tmp_path / "weights_only")
    loaded = distsave.saved_model.load(tmp_path / "weights_only")
    assert loaded.signatures == {} and set(loaded.variables) == set(model.state_dict())
    assert loaded.manifest["architecture"]["class"] == "distsave.Sequential"
    distsave.saved_model.save(model, tmp_path / "with", input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    assert "serving_default" in distsave.saved_model.load(tmp_path / "with").signatures


def test_mixed_api_model_save_then_saved_model_load(trained, tmp_path, small_test):
    trained.save(tmp_path / "m")
    loaded = distsave.saved_model.load(tmp_path / "m")
    images = next(iter(small_test))[0]
    expected = trained.predict(images, batch_size=len(images))
    assert torch.equal(loaded.signatures["serving_default"](images)["output_0"], expected)


@distsave.register_serializable(package="tests")
class AddsPositions(nn.Module):
    """Makes a tensor where its input is, as positional encodings and an RNN's first state do."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return self.linear(x) + torch.arange(self.width, dtype=x.dtype, device=x.device)


def test_a_program_makes_its_tensors_where_its_inputs_are(tmp_path):
    model = distsave.Sequential([AddsPositions(4)], input_spec=distsave.TensorSpec((None, 4)))
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
    model.save(tmp_path / "m")  # the program is exported from the rebuild on `meta`
    distsave.saved_model.save(model, tmp_path / "sm")  # exported on the CPU
    for name in ("m", "sm"):
        (served,) = distsave.saved_model.load(tmp_path / name).signatures["serving_default"](x).values()
        assert torch.equal(served, expected), name
    moved = distsave.saved_model.load(tmp_path / "sm").to("meta")  # another device than the export's
    (served,) = moved.signatures["serving_default"](x.to("meta")).values()
    assert served.device.type == "meta" and served.shape == (3, 4)


def test_export_failure_is_a_save_error_and_writes_nothing(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(SaveError, match="Could not export signature 'serving_default'"):
        distsave.saved_model.save(DataDependent(), tmp_path / "sm", example_inputs=(torch.ones(2, 3),))
    assert not (tmp_path / "sm").exists()


def test_distributed_inference_equals_single_process(trained, tmp_path, mnist):
    distsave.saved_model.save(trained, tmp_path / "sm")
    run_script("distributed_inference.py", str(tmp_path / "sm"), str(tmp_path / "out.safetensors"),
               timeout=180)
    result = load_file(tmp_path / "out.safetensors")
    images, labels = next(iter(mnist["test"].take(500).batch(500)))
    with torch.no_grad():
        expected = trained(images.float() / 255)
    assert torch.equal(result["labels"], labels)
    torch.testing.assert_close(result["outputs"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(result["outputs"].argmax(1), expected.argmax(1))
