import json

import pytest
import torch
from torch import nn

from tests.conftest import assert_every_weight_moved, cnn_model, state_of, tiny_model

import distsave
from distsave import ArtifactError, SaveError


def test_artifact_holds_only_json_and_safetensors_listed_with_checksums(trained, tmp_path):
    trained.save(tmp_path / "m")
    files = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert files == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                     "signatures/serving_default.json"]
    for f in (tmp_path / "m").rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"
    manifest = json.loads((tmp_path / "m/manifest.json").read_text())
    assert manifest["format"] == "distsave" and manifest["kind"] == "model"
    assert set(manifest["written_by"]) >= {"distsave", "torch", "safetensors"}
    assert manifest["parameter_count"] == 347_146
    assert manifest["training_state"] == {"epoch": 1, "step": 16}
    assert manifest["compile"]["optimizer"]["class"] == "Adam"
    assert manifest["compile"]["metrics"] == [{"class": "SparseCategoricalAccuracy",
                                               "config": {"name": "accuracy"}}]
    assert all(len(digest) == 32 for entry in manifest["files"].values() for digest in entry["xxh3_128"])


def test_restored_model_reports_the_same_loss_and_accuracy(trained, small_test, tmp_path):
    before = trained.evaluate(small_test, verbose=0, return_dict=True)
    trained.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    after = restored.evaluate(small_test, verbose=0, return_dict=True)
    assert after == before  # TF 2.3 reported accuracy ~0.099 here
    assert after["accuracy"] > 0.5


def test_fit_continues_after_loading_as_if_never_saved(small_train, tmp_path):
    uninterrupted = cnn_model()
    initial = state_of(uninterrupted)
    history = uninterrupted.fit(small_train, epochs=2, verbose=0)
    first = cnn_model()
    first.fit(small_train, epochs=1, verbose=0)
    first.save(tmp_path / "m")
    resumed = distsave.load_model(tmp_path / "m")
    assert resumed.compiled and isinstance(resumed.optimizer, torch.optim.Adam)
    after_first = state_of(resumed)
    second = resumed.fit(small_train, epochs=1, verbose=0)  # no compile()
    assert_every_weight_moved(state_of(resumed), after_first)  # the resumed optimizer steps
    assert_every_weight_moved(after_first, initial)
    assert second.epoch == [1] and resumed.epoch == 2
    assert second.history["loss"][0] == pytest.approx(history.history["loss"][1], rel=1e-6)
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_sharded_weights_use_hugging_face_names(trained, tmp_path):
    trained.save(tmp_path / "m", max_shard_size=400_000)
    names = sorted(p.name for p in (tmp_path / "m").glob("model*"))
    assert "model.safetensors.index.json" in names
    assert "model-00001-of-00003.safetensors" in names
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(trained.state_dict())
    restored = distsave.load_model(tmp_path / "m")
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in trained.state_dict().items())


@distsave.register_serializable(package="tests")
class Residual(nn.Module):
    def __init__(self, width: int, scale: float = 1.0, activation: nn.Module | None = None):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.scale = scale
        self.activation = activation or nn.Identity()

    def forward(self, x):
        return x + self.scale * self.activation(self.linear(x))


@distsave.register_serializable(package="tests")
class TwoHeads(distsave.Model):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.body = nn.LazyLinear(hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_registered_classes_rebuild_with_their_arguments(tmp_path):
    model = distsave.Sequential([Residual(4, scale=0.5, activation=nn.Tanh()), nn.Linear(4, 2)],
                                input_spec=distsave.TensorSpec((None, 4)))
    model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert restored.layers[0].scale == 0.5 and isinstance(restored.layers[0].activation, nn.Tanh)
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), model(x))


def test_subclassed_model_with_lazy_layers_saves_after_one_call(tmp_path):
    model = TwoHeads(hidden=6)
    assert model.inputs is None
    with pytest.raises(SaveError) as error:
        model.save(tmp_path / "m")
    message = str(error.value)
    assert "input_spec" in message and "call the model once" in message and "model.fit" in message
    assert not (tmp_path / "m").exists()
    x = torch.randn(3, 5)
    model(x)
    model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert isinstance(restored, TwoHeads) and torch.equal(restored(x), model(x))


def test_unregistered_class_fails_at_save_with_the_fix(tmp_path):
    class Mine(nn.Module):
        def forward(self, x):
            return x

    model = distsave.Sequential([Mine()], input_spec=distsave.TensorSpec((None, 2)))
    with pytest.raises(SaveError, match=r"Mine.*register_serializable"):
        model.save(tmp_path / "m")


def test_class_unknown_at_load_is_named_with_how_to_register(tmp_path):
    model = distsave.Sequential([Residual(2)], input_spec=distsave.TensorSpec((None, 2)))
    model.save(tmp_path / "m")
    from tests.conftest import rewrite_manifest

    rewrite_manifest(tmp_path / "m", lambda m: m["architecture"]["layers"][0].update({"class": "tests>Gone"}))
    with pytest.raises(ArtifactError, match=r"Unknown class 'tests>Gone'.*register_serializable"):
        distsave.load_model(tmp_path / "m")


def test_builtin_outside_the_allowlist_is_refused_at_load(tmp_path):
    model = tiny_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    model.save(tmp_path / "m")
    from tests.conftest import rewrite_manifest

    rewrite_manifest(tmp_path / "m", lambda m: m["architecture"]["layers"][0].update({"class": "torch.nn.Module"}))
    with pytest.raises(ArtifactError, match="not on distsave's allowlist"):
        distsave.load_model(tmp_path / "m")


@pytest.mark.parametrize("inside", [True, False])
def test_save_inside_and_outside_scope(inside, tmp_path, small_train):
    strategy = distsave.OneDeviceStrategy("cpu")
    with strategy.scope():
        model = cnn_model()
    initial = state_of(model)
    model.fit(small_train, epochs=1, verbose=0)
    if inside:
        with strategy.scope():
            model.save(tmp_path / "m")
    else:
        model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert restored.epoch == 1
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())
    assert_every_weight_moved(state_of(restored), initial)  # the trained weights, not the initial ones


def test_existing_folder_that_is_not_an_artifact_is_never_replaced(trained, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/cat.jpg").write_bytes(b"meow")
    with pytest.raises(SaveError, match="not a distsave artifact"):
        trained.save(tmp_path / "photos")
    assert (tmp_path / "photos/cat.jpg").read_bytes() == b"meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError, match="existing file"):
        trained.save(tmp_path / "file")


def test_uncompiled_model_saves_and_loads_uncompiled(tmp_path):
    model = distsave.Sequential([nn.Linear(3, 2)], input_spec=distsave.TensorSpec((None, 3)))
    model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert not restored.compiled and torch.equal(restored.layers[0].weight, model.layers[0].weight)


def test_wrapped_module_and_nn_loss_object(tmp_path):
    model = distsave.Model(nn.Sequential(nn.Linear(4, 3)), input_spec=distsave.TensorSpec((None, 4)))
    model.compile(loss=nn.CrossEntropyLoss(label_smoothing=0.1), optimizer="sgd", metrics=["accuracy"])
    model.fit(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8, verbose=0)
    model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert restored.loss.module.label_smoothing == 0.1
    assert restored.optimizer.defaults["lr"] == 0.01
