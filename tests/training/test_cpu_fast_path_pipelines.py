"""Evaluation pipelines on the CPU: `map` over an in-memory table runs once per pass, vectorised,
with the elements a per-element map gives; and evaluate/predict use the fused conv blocks."""

import torch

import distsave
from tests.conftest import cnn_model


def _images():
    return distsave.data.Dataset.from_tensor_slices((torch.arange(40 * 4, dtype=torch.uint8).view(40, 4),
                                                    torch.arange(40)))


def test_map_over_a_table_is_vectorised_and_gives_the_per_element_results():
    calls = []

    def scale(image, label):
        calls.append(1)
        return image.float() / 255, label

    batches = list(_images().map(scale).batch(16))
    assert len(calls) == 1  # one vmapped call for the whole pass, not 40
    expected = [(image.float() / 255, label) for image, label in _images().batch(16)]
    assert len(batches) == len(expected) == 3
    for (x, y), (ex, ey) in zip(batches, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_map_vmap_cannot_run_falls_back_to_per_element_calls():
    calls = []

    def noisy(image, label):
        calls.append(1)
        return image.float() + torch.rand(()), label  # randomness: vmap refuses it

    pipeline = _images().map(noisy).batch(16)
    assert sum(len(y) for _, y in pipeline) == 40
    assert len(calls) == 1 + 40  # the refused vmap attempt, then every element
    calls.clear()
    list(pipeline)
    assert len(calls) == 40  # the pipeline does not try vmap again


def test_evaluate_and_predict_on_a_cpu_use_the_fused_conv_blocks(small_test, monkeypatch):
    from distsave.training import cpu_blocks

    fused = []
    original = cpu_blocks._block
    monkeypatch.setattr(cpu_blocks, "_block", lambda *a, **k: fused.append(1) or original(*a, **k))
    model = cnn_model()
    fast = model.evaluate(small_test, verbose=0, return_dict=True)
    predictions = model.predict(small_test)
    assert len(fused) == 2 * 4  # 4 batches of 128, evaluate and predict
    assert "forward" not in model.__dict__  # the Sequential's own forward is back
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"], jit_compile=False)
    plain = model.evaluate(small_test, verbose=0, return_dict=True)
    assert len(fused) == 8
    assert fast["accuracy"] == plain["accuracy"]
    assert abs(fast["loss"] - plain["loss"]) < 1e-6
    torch.testing.assert_close(predictions, model.predict(small_test), rtol=1e-5, atol=1e-5)
