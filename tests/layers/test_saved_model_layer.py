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
