import json

import pytest
import torch
from torch import nn

from tests.conftest import assert_every_weight_moved, state_of

import distsave
from distsave.layers import SavedModelLayer


@pytest.fixture
def exported(exported_with_embed):
    return exported_with_embed


def transfer_model(exported, trainable):
    layer = SavedModelLayer(distsave.saved_model.load(exported), signature="embed", trainable=trainable)
    torch.manual_seed(0)
    model = distsave.Sequential([layer, nn.Linear(64, 10)])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model, layer


def weights(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_trainable_layer_fine_tunes(exported, small_train):
    model, layer = transfer_model(exported, trainable=True)
    before = weights(layer)
    model.fit(small_train, epochs=1, verbose=0)
    after = weights(layer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_frozen_layer_is_unchanged_by_fit(exported, small_train):
    model, layer = transfer_model(exported, trainable=False)
    before, head = weights(layer), state_of(model.layers[1])
    model.fit(small_train, epochs=1, verbose=0)
    assert_every_weight_moved(state_of(model.layers[1]), head)  # fit did train the model...
    assert all(torch.equal(before[k], v) for k, v in weights(layer).items())  # ...around the frozen layer
    assert all(not p.requires_grad for p in layer.parameters())


def test_model_with_the_layer_saves_and_loads_through_both_apis(exported, small_train, tmp_path):
    model, _ = transfer_model(exported, trainable=True)
    model.fit(small_train, epochs=1, verbose=0)
    x = torch.rand(6, 1, 28, 28)
    expected = model.predict(x)
    model.save(tmp_path / "high")
    restored = distsave.load_model(tmp_path / "high")
    assert torch.equal(restored.predict(x), expected)
    loaded_layer = restored.layers[0]
    assert loaded_layer.trainable and all(p.requires_grad for p in loaded_layer.parameters()
                                          if p.is_floating_point())
    before = weights(loaded_layer)
    restored.fit(small_train, epochs=1, verbose=0)  # still trainable after loading
    assert any(not torch.equal(before[k], v) for k, v in weights(loaded_layer).items())
    distsave.saved_model.save(model, tmp_path / "low")
    served = distsave.saved_model.load(tmp_path / "low").signatures["serving_default"](x)["output_0"]
    assert torch.equal(served, expected)


def test_output_key_and_unknown_names(exported):
    loaded = distsave.saved_model.load(exported)
    assert SavedModelLayer(loaded, output_key="output_0")(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"Unknown signature 'encode'.*\['embed', 'serving_default'\]"):
        SavedModelLayer(loaded, signature="encode")
    with pytest.raises(ValueError, match="has no output 'probs'"):
        SavedModelLayer(loaded, output_key="probs")


def rebuilt_from_entry(entry):
    return SavedModelLayer.from_spec(json.loads(json.dumps(entry)))


def test_rebuilt_on_the_meta_device_then_filled_in_place_matches_the_original(exported):
    original = SavedModelLayer(distsave.saved_model.load(exported), signature="embed")
    entry = original.distsave_spec()
    with torch.device("meta"):
        layer = rebuilt_from_entry(entry)
    assert all(t.device.type == "meta" for t in layer.state_dict().values())
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in layer.state_dict().items():
            tensor.copy_(original.state_dict()[name])
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(layer(x), original(x))
    assert layer.distsave_spec()["state"] == entry["state"]
    assert entry["state"]["root.0.weight"] == {"shape": [32, 1, 3, 3], "dtype": "float32"}


@pytest.mark.parametrize("field, value, message", [
    ("config", {"signature": "embed", "output_key": None, "trainable": "yes"},
     r"'config\.trainable': expected bool, received 'yes'"),
    ("config", {"signature": "embed", "output_key": "probs", "trainable": True}, r"has no output 'probs'"),
    ("config", {"signature": "embed", "trainable": True, "import": "os"}, r"field 'config'"),
    ("state", {"root.0.weight": {"shape": [32, 1, 3, -3], "dtype": "float32"}}, r"'state\.root\.0\.weight'"),
    ("state", {"root.0.weight": {"shape": [32, 1, 3, 3], "dtype": "load"}}, r"'state\.root\.0\.weight'"),
    ("state", {"root.0.weight": {"shape": [32, 1, 3, 3], "dtype": ["float32"]}}, r"'state\.root\.0\.weight'"),
    ("state", {"root.0.weight": {"shape": [2**40, 2**40, 2**40], "dtype": "float32"}},
     r"'state\.root\.0\.weight': cannot hold a tensor"),
    ("inputs", [{"shape": [None, "1"], "dtype": "float32", "name": "x"}], r"field 'inputs\[0\]'"),
    ("outputs", "embedding", r"field 'outputs'"),
    ("program", [], r"field 'program'"),
])
def test_a_malformed_entry_is_refused_naming_the_field(exported, field, value, message):
    entry = SavedModelLayer(distsave.saved_model.load(exported), signature="embed").distsave_spec()
    entry[field] = value
    with torch.device("meta"), pytest.raises(distsave.ArtifactError, match=message):
        rebuilt_from_entry(entry)


def test_state_that_does_not_match_the_program_is_refused(exported):
    entry = SavedModelLayer(distsave.saved_model.load(exported), signature="embed").distsave_spec()
    entry["state"]["root.0.weight"]["shape"] = [64, 1, 3, 3]
    with torch.device("meta"), pytest.raises(distsave.ArtifactError,
                                             match=r"'root\.0\.weight' is torch\.float32 \[64, 1, 3, 3\] in the "
                                                   r"artifact, but the program was traced with"):
        rebuilt_from_entry(entry)
