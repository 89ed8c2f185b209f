"""The captured (CUDA graph) train step's choices, as far as a CPU can check them; the step
itself is compared with the eager one in tests/gpu."""

import pytest

from tests.conftest import cnn_model

from distsave.training.steps import CaptureError, CapturedTrainStep, TrainStep, capture_failed, make_train_step


def test_auto_on_a_cpu_trains_eagerly(small_train):
    model = cnn_model()
    assert model.jit_compile == "auto"
    step = make_train_step(model, model, model.distribute_strategy, [])
    assert isinstance(step, TrainStep) and not isinstance(step, CapturedTrainStep)
    before = model.evaluate(small_train, verbose=0, return_dict=True)["loss"]
    model.fit(small_train, epochs=1, verbose=0)
    assert model.evaluate(small_train, verbose=0, return_dict=True)["loss"] < before


def test_requiring_capture_where_it_is_impossible_says_why():
    model = cnn_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adagrad", jit_compile=True)
    with pytest.raises(ValueError, match="not on a CUDA device.*Adagrad has no 'capturable' mode"):
        make_train_step(model, model, model.distribute_strategy, [])


def test_jit_compile_takes_three_values():
    with pytest.raises(ValueError, match="jit_compile"):
        cnn_model().compile(loss="mse", optimizer="adam", jit_compile="xla")


def test_a_failed_capture_raises_under_true_and_warns_under_auto(caplog):
    """The policy the captured step applies when CUDA-graph capture throws (tests/gpu runs it)."""
    model = cnn_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", jit_compile=True)
    with pytest.raises(CaptureError, match=r"requires.*capture failed \(RuntimeError: no sync here\).*'auto'"):
        capture_failed(model, RuntimeError("no sync here\ndetails"))
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", jit_compile="auto")
    with caplog.at_level("WARNING"):
        capture_failed(model, RuntimeError("no sync here"))
    assert "cannot capture the train step" in caplog.text and "no sync here" in caplog.text
