"""Attack class: memory bombs. An architecture (or optimizer state) that claims far bigger
tensors than its files hold is refused before memory is allocated: the model is built on the
``meta`` device and compared with the safetensors headers first."""

import json

import pytest
import torch
from torch import nn

from tests.conftest import rewrite_manifest, run_script

import distsave
from distsave import ArtifactError

SMALL = distsave.TensorSpec((None, 8))


def small_model(*layers: nn.Module) -> distsave.Sequential:
    torch.manual_seed(0)
    model = distsave.Sequential(list(layers) or [nn.Linear(8, 4)], input_spec=SMALL)
    model.compile(loss="mse", optimizer="adam")
    model.fit(torch.rand(16, 8), torch.rand(16, 4), epochs=1, verbose=0)
    return model


def with_layer(saved, tmp_path, name: str, layer: dict, input_spec=None):
    """A copy of ``saved`` whose architecture's first layer is ``layer``; checksums recomputed."""
    import shutil

    target = tmp_path / name
    shutil.copytree(saved, target)

    def edit(manifest):
        manifest["architecture"]["layers"][0] = layer
        if input_spec is not None:
            manifest["input_spec"] = input_spec

    rewrite_manifest(target, edit)
    return target


BOMBS = {
    "linear_20000": {"class": "torch.nn.Linear", "config": {"in_features": 20000, "out_features": 20000, "bias": True}},
    "linear_1e7": {"class": "torch.nn.Linear", "config": {"in_features": 10**7, "out_features": 10**7, "bias": True}},
    "embedding": {"class": "torch.nn.Embedding", "config": {"num_embeddings": 10**9, "embedding_dim": 1024}},
    "lstm": {"class": "torch.nn.LSTM", "config": {"input_size": 8, "hidden_size": 10**5}},
    "registered": {"class": "Hostile>Wide", "config": {"width": 10**6}},
    "lazy_linear": {"class": "torch.nn.LazyLinear", "config": {"out_features": 4, "bias": True}},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "m"
    small_model().save(path)
    return path


def test_claimed_shapes_are_refused_before_allocating(saved, tmp_path):
    paths = {name: with_layer(saved, tmp_path, name, layer) for name, layer in BOMBS.items()}
    paths["lazy_linear"] = with_layer(saved, tmp_path, "lazy_huge_input", BOMBS["lazy_linear"],
                                      input_spec=[{"shape": [None, 2**30], "dtype": "float32", "name": "x"}])
    result = run_script("load_hostile_rss.py", str(saved), *map(str, paths.values()), timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, path in paths.items():
        outcome = report["results"][str(path)]
        assert outcome.startswith("ArtifactError:"), (name, outcome)
        assert "do not fit the architecture" in outcome, (name, outcome)
    # 20000 x 20000 fp32 alone is 1.6 GB; the bound leaves room for allocator noise only.
    assert report["growth"] < 64 * 2**20, report["growth"]


def test_optimizer_state_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    small_model().save(tmp_path / "m")
    state = load_file(tmp_path / "m/optimizer.safetensors")
    state["0.weight/exp_avg"] = torch.zeros(3, 3)
    (tmp_path / "m/optimizer.safetensors").unlink()
    save_file(state, tmp_path / "m/optimizer.safetensors")
    rewrite_manifest(tmp_path / "m")
    with pytest.raises(ArtifactError, match=r"0.weight/exp_avg: shape \[3, 3\], parameter 0.weight has \[4, 8\]"):
        distsave.load_model(tmp_path / "m")
    assert distsave.load_model(tmp_path / "m", compile=False).optimizer is None


def test_the_check_is_what_stops_the_bomb(saved, tmp_path, monkeypatch):
    """With the header comparison switched off, a load that reads into memory of its own
    allocates the claimed weights for real (compile=False: the optimizer's own check would come
    first; a mapped load takes its tensors from the files and allocates no claimed size)."""
    from distsave.saving import model_format

    bomb = with_layer(saved, tmp_path, "bomb", {"class": "torch.nn.Linear",
                                                "config": {"in_features": 4000, "out_features": 4000, "bias": True}})
    allocated = []
    original = model_format._allocate
    monkeypatch.setattr(model_format, "_adopt_stored_dtypes", lambda *args: None)
    monkeypatch.setattr(model_format, "_allocate", lambda model, device, *stored: (
        original(model, device, *stored), allocated.append(sum(p.numel() for p in model.parameters()))))
    with pytest.raises(Exception):
        distsave.load_model(bomb, compile=False, mmap=False)
    assert allocated and allocated[0] >= 4000 * 4000
