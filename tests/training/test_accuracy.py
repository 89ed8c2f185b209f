"""The workflow's acceptance: the CNN reaches 0.97 test accuracy in 2 epochs, 64 per replica."""

import torch

from tests.conftest import ROOT, read_reports, run_python, scale

import distsave
from distsave.demo import workflow_cnn


def test_one_device_cpu_reaches_097(mnist):
    strategy = distsave.OneDeviceStrategy("cpu")
    torch.manual_seed(0)
    with strategy.scope():
        model = distsave.Sequential(workflow_cnn())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    history = model.fit(mnist["train"].map(scale).cache().shuffle(10000, seed=0).batch(64), epochs=2, verbose=0)
    loss, accuracy = model.evaluate(mnist["test"].map(scale).batch(256), verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert accuracy >= 0.97


def test_mirrored_two_cpu_replicas_reach_097_with_identical_parameters(tmp_path):
    report = tmp_path / "report"
    run_python([str(ROOT / "examples/train_mnist.py"), "--cpu-replicas", "2", "--epochs", "2",
                "--seed", "0", "--report", str(report)], timeout=600)
    replicas = read_reports(report, 2)
    assert replicas[0]["parameters"] == replicas[1]["parameters"]
    assert replicas[0]["test_accuracy"] >= 0.97
    assert replicas[0]["test_accuracy"] == replicas[1]["test_accuracy"]
