"""Precision: compile(precision=...) trains under autocast, is saved in the compile config and
comes back with load_model; bf16 and fp16 models round-trip through both APIs."""

import pytest
import torch
from torch import nn

import distsave

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def model(precision: str = "32", dtype: torch.dtype = torch.float32, optimizer: str = "adam") -> distsave.Sequential:
    torch.manual_seed(0)
    net = distsave.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]).to(dtype)
    net.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                precision=precision)
    return net


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_and_comes_back_after_load(precision, tmp_path):
    mixed = model(precision)
    history = mixed.fit(X, Y, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # master weights stay float32
    mixed.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert restored.precision.name == precision
    assert restored.evaluate(X, Y, verbose=0) == pytest.approx(mixed.evaluate(X, Y, verbose=0))
    restored.fit(X, Y, epochs=1, verbose=0)


def test_mixed_precision_changes_the_forward_dtype():
    seen = []
    net = model("bf16-mixed")
    net.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    net.fit(X, Y, epochs=1, batch_size=64, verbose=0)
    assert seen == [torch.bfloat16]


def test_keras_policy_names_are_accepted_and_unknown_ones_explained():
    assert model("mixed_bfloat16").precision.name == "bf16-mixed"
    with pytest.raises(ValueError, match="Unknown precision 'fp8'.*bf16-mixed"):
        model("fp8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_round_trip_through_both_apis(dtype, tmp_path):
    net = model(dtype=dtype, optimizer="sgd")  # Adam's eps underflows in pure float16
    x = X.to(dtype)
    net.fit(x, Y, epochs=1, verbose=0)
    net.save(tmp_path / "high")
    restored = distsave.load_model(tmp_path / "high")
    assert all(p.dtype == dtype for p in restored.parameters())
    assert not net.predict(x).isnan().any()
    assert torch.equal(restored(x), net.predict(x))
    distsave.saved_model.save(net, tmp_path / "low")
    loaded = distsave.saved_model.load(tmp_path / "low")
    assert torch.equal(loaded.signatures["serving_default"](x)["output_0"], net.predict(x))
