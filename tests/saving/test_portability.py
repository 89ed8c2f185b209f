"""Save under {no strategy, OneDevice, Mirrored x1, Mirrored x2} x {inside, outside scope};
load each under {no strategy, OneDevice, Mirrored x2}: equal predictions, training goes on.

Predictions are compared bitwise, so every process computing them runs one intra-op thread
(this module and tests/scripts/portability.py): fp32 sums split over 1 and 2 threads differ in
the last bits (about 5e-8), which is the thread count, not the artifact.
"""

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import cnn_model, run_script, scale

import distsave

SAVED_UNDER = ["none", "onedevice-inside", "onedevice-outside", "mirrored1-inside",
               "mirrored1-outside", "mirrored2-inside", "mirrored2-outside"]


def strategy_named(name: str):
    if name.startswith("onedevice"):
        return distsave.OneDeviceStrategy("cpu")
    if name.startswith("mirrored1"):
        return distsave.MirroredStrategy(devices=["cpu"])
    return None


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def matrix(one_thread, tmp_path_factory, mnist):
    folder = tmp_path_factory.mktemp("matrix")
    train = mnist["train"].take(1024).map(scale).cache().batch(64)
    test_images = next(iter(mnist["test"].take(512).map(scale).batch(512)))[0]
    for name in SAVED_UNDER[:5]:
        strategy = strategy_named(name)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = cnn_model()
        model.fit(train, epochs=1, verbose=0)
        with strategy.scope() if strategy and name.endswith("inside") else contextlib.nullcontext():
            model.save(folder / name)
        reference = model.predict(test_images, batch_size=128)  # as the loaded models predict
        save_file({"predictions": reference}, folder / f"{name}.reference.safetensors")
    run_script("portability.py", "save", str(folder), timeout=300)
    run_script("portability.py", "load", str(folder), *SAVED_UNDER, timeout=600)
    return folder, train, test_images


def reference(folder, name):
    return load_file(folder / f"{name}.reference.safetensors")["predictions"]


@pytest.mark.parametrize("saved_under", SAVED_UNDER)
@pytest.mark.parametrize("loaded_under", ["none", "onedevice"])
def test_load_in_process_predicts_the_same_and_trains_on(matrix, saved_under, loaded_under):
    folder, train, test_images = matrix
    strategy = strategy_named(loaded_under)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = distsave.load_model(folder / saved_under)
    assert model.distribute_strategy.device == torch.device("cpu")
    predictions = model.predict(test_images, batch_size=128)
    assert torch.equal(predictions, reference(folder, saved_under))
    before = model.evaluate(train, verbose=0, return_dict=True)["loss"]
    model.fit(train, epochs=1, verbose=0)
    assert model.evaluate(train, verbose=0, return_dict=True)["loss"] < before


@pytest.mark.parametrize("saved_under", SAVED_UNDER)
def test_load_under_two_replicas_predicts_the_same_and_trains_on(matrix, saved_under):
    folder, _, _ = matrix
    predictions = load_file(folder / f"{saved_under}.mirrored2.safetensors")["predictions"]
    assert torch.equal(predictions, reference(folder, saved_under))
    before, after = json.loads((folder / "mirrored2-losses.json").read_text())[saved_under]
    assert after < before
