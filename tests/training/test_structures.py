"""A two-input model with dict outputs: per-output losses, loss weights and metrics (Keras'
semantics and names), saved and loaded, and fit continues."""

import pytest
import torch
from torch import nn

import distsave
from distsave.data import Dataset


@distsave.register_serializable()
class TwoHeads(nn.Module):
    """Image and tabular inputs; a class head and a regression head."""

    def __init__(self, features: int = 3):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        self.table = nn.Linear(features, 8)
        self.kind = nn.Linear(16, 2)
        self.size = nn.Linear(16, 1)

    def forward(self, image, table):
        h = torch.cat([self.image(image), self.table(table)], 1).relu()
        return {"kind": self.kind(h), "size": self.size(h).squeeze(1)}


def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    image, table = torch.randn(64, 1, 4, 4, generator=g), torch.randn(64, 3, generator=g)
    labels = {"kind": (image.mean((1, 2, 3)) > 0).long(), "size": table.sum(1)}
    return Dataset.from_tensor_slices(((image, table), labels)).batch(16)


def compiled(**kwargs) -> distsave.Model:
    torch.manual_seed(0)
    model = distsave.Model(TwoHeads())
    model.compile(optimizer="adam", loss={"kind": "sparse_categorical_crossentropy", "size": "mse"},
                  metrics={"kind": ["accuracy"], "size": ["mae"]}, **kwargs)
    return model


@pytest.fixture(scope="module")
def trained():
    model = compiled(loss_weights={"kind": 1.0, "size": 0.5})
    history = model.fit(data(), epochs=2, verbose=0)
    return model, history


def test_history_names_each_outputs_loss_and_metrics(trained):
    _, history = trained
    assert list(history.history) == ["loss", "kind_loss", "size_loss", "kind_accuracy", "size_mae"]
    losses = history.history
    for epoch in range(2):
        assert losses["loss"][epoch] == pytest.approx(losses["kind_loss"][epoch] + 0.5 * losses["size_loss"][epoch],
                                                      rel=1e-5)
    assert losses["loss"][1] < losses["loss"][0]


def test_two_input_dict_output_model_saves_loads_and_trains_on(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "two")
    restored = distsave.load_model(tmp_path / "two")
    assert restored.evaluate(data(), verbose=0, return_dict=True) == pytest.approx(
        model.evaluate(data(), verbose=0, return_dict=True))
    assert restored.loss_weights == {"kind": 1.0, "size": 0.5}
    history = restored.fit(data(), epochs=1, verbose=0)
    assert restored.epoch == 3 and set(history.history) == {"loss", "kind_loss", "size_loss",
                                                            "kind_accuracy", "size_mae"}
    outputs = restored.predict(data().map(lambda x, y: (x,)))
    assert set(outputs) == {"kind", "size"} and outputs["kind"].shape == (64, 2)


def test_one_loss_for_dict_outputs_says_to_name_them():
    model = distsave.Model(TwoHeads())
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"returns a dict with keys \['kind', 'size'\].*loss=\{"):
        model.fit(data(), verbose=0)


def test_loss_weights_must_name_outputs_with_a_loss():
    with pytest.raises(ValueError, match="loss_weights names outputs"):
        compiled(loss_weights={"colour": 1.0})
