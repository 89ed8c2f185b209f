"""GPU behaviour, run on a machine with CUDA (the device tool); skipped cleanly elsewhere."""

import pytest
import torch

from safetensors.torch import load_file

from tests.conftest import assert_every_weight_moved, cnn_model, read_reports, run_python, run_script, scale, state_of
from tests.saving.test_layer_round_trips import LastStep
from tests.saving.test_saved_model import AddsPositions

import distsave
from distsave.demo import workflow_cnn
from distsave.training import loop, steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_one_device_cuda_trains_and_loads_on_cpu_with_the_same_predictions(mnist, tmp_path):
    strategy = distsave.OneDeviceStrategy("/gpu:0")
    with strategy.scope():
        model = cnn_model()
    model.fit(mnist["train"].take(4096).map(scale).cache().batch(64), epochs=1, verbose=0)
    assert next(model.parameters()).device.type == "cuda"
    images = next(iter(mnist["test"].take(256).map(scale).batch(256)))[0]
    on_gpu = model.predict(images).cpu()
    model.save(tmp_path / "m")
    with distsave.OneDeviceStrategy("cpu").scope():
        restored = distsave.load_model(tmp_path / "m")
    torch.testing.assert_close(restored.predict(images), on_gpu, rtol=1e-4, atol=1e-4)
    served = distsave.saved_model.load(tmp_path / "m").signatures["serving_default"](images)["output_0"]
    assert served.device.type == "cuda"  # no scope: the default strategy's device, as in TF
    torch.testing.assert_close(served.cpu(), on_gpu, rtol=1e-4, atol=1e-4)


def _replicas_script(tmp_path, optimizer: str, *options: str) -> list[dict]:
    """tests/scripts/gpu_replicas.py in its own process (it starts one replica per GPU)."""
    run_script("gpu_replicas.py", str(tmp_path / "r"), optimizer, *options, timeout=300)
    return read_reports(tmp_path / "r", torch.cuda.device_count())


def test_mirrored_over_every_gpu_uses_nccl_trains_and_saves_once(mnist, tmp_path):
    reports = _replicas_script(tmp_path, "adam")
    assert {r["replicas"] for r in reports} == {torch.cuda.device_count()}
    assert {r["backend"] for r in reports} == {"nccl"}
    if len(reports) > 1:  # one GPU captures its single-device step; several run eager DDP by default
        assert not any(r["captured"] for r in reports), reports
    assert reports[0]["loss"][1] < reports[0]["loss"][0]
    with distsave.MirroredStrategy(devices=["cuda:0"]).scope():
        restored = distsave.load_model(tmp_path / "r.artifact")
    assert next(restored.parameters()).device.type == "cuda"
    restored.fit(mnist["train"].take(1024).map(scale).batch(64), epochs=1, verbose=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_captured_replicas_equal_one_gpu_on_the_whole_batch_and_each_other(mnist, tmp_path, monkeypatch):
    reports = _replicas_script(tmp_path, "sgd", "captured")
    assert {r["step"] for r in reports} == {"CapturedReplicaStep"} and all(r["captured"] for r in reports)
    replicas = [load_file(tmp_path / f"r.{i}.safetensors") for i in range(len(reports))]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with distsave.OneDeviceStrategy("cuda:0").scope():
        torch.manual_seed(0)
        single = distsave.Sequential(workflow_cnn())
        single.compile(loss="sparse_categorical_crossentropy", optimizer="sgd", metrics=["accuracy"])
    initial = state_of(single)
    single.fit(mnist["train"].take(4096).map(scale).cache().batch(128), epochs=2, verbose=0)
    assert_every_weight_moved(replicas[0], initial)
    for name, tensor in single.state_dict().items():
        for other in replicas[1:]:
            assert torch.equal(replicas[0][name], other[name]), name  # replicas bitwise equal
        torch.testing.assert_close(replicas[0][name], tensor.cpu(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_seed_workflow_where_the_program_cannot_restart_forks_two_gpu_replicas(tmp_path):
    """The notebook's cells through ``python -c`` (the GPU image has no Jupyter): the same fork path."""
    from tests.strategies.test_forked import CHECK, FIT, SETUP

    prelude = f"DEVICES = ['cuda:0', 'cuda:1']\nARTIFACT = {str(tmp_path / 'model')!r}\n"
    result = run_python(["-c", prelude + SETUP + FIT + CHECK], timeout=300)
    assert "seed workflow ok" in result.stdout


def test_loaded_signature_runs_on_the_gpu_under_a_strategy(tmp_path):
    with distsave.OneDeviceStrategy("cpu").scope():
        trained = cnn_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    distsave.saved_model.save(trained, tmp_path / "sm")
    with distsave.OneDeviceStrategy("cuda:0").scope():
        loaded = distsave.saved_model.load(tmp_path / "sm")
    x = torch.rand(5, 1, 28, 28)
    out = loaded.signatures["serving_default"](x)["output_0"]
    assert out.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(out.cpu(), trained(x), rtol=1e-4, atol=1e-4)


def test_a_program_that_makes_tensors_runs_on_the_gpu(tmp_path):
    torch.manual_seed(0)
    model = distsave.Sequential([AddsPositions(6), torch.nn.Unflatten(1, (2, 3)),
                                 LastStep(torch.nn.LSTM(3, 4, batch_first=True))],
                                input_spec=distsave.TensorSpec((None, 6)))
    model.save(tmp_path / "m")  # the program is exported from the rebuild on `meta`
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
    with distsave.OneDeviceStrategy("cuda:0").scope():
        loaded = distsave.saved_model.load(tmp_path / "m")
    out = loaded.signatures["serving_default"](x)["output_0"]
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def train_steps(monkeypatch):
    """Every train step ``fit`` builds, to check whether it captured a graph."""
    made = []

    def recording(*args, **kwargs):
        made.append(steps.make_train_step(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loop, "make_train_step", recording)
    return made


def _train(mnist, jit_compile, examples=1000):
    with distsave.OneDeviceStrategy("cuda:0").scope():
        model = cnn_model()
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"],
                      jit_compile=jit_compile)
    history = model.fit(mnist["train"].take(examples).map(scale).cache().batch(64), epochs=2, verbose=0)
    return model, history


def test_a_program_exported_through_a_gpu_layer_runs_on_cpu_and_gpu(mnist, tmp_path):
    with distsave.OneDeviceStrategy("cpu").scope():
        base = cnn_model(input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    distsave.saved_model.save(base, tmp_path / "base")
    with distsave.OneDeviceStrategy("cuda:0").scope():
        layer = distsave.layers.SavedModelLayer(distsave.saved_model.load(tmp_path / "base"))
        outer = distsave.Sequential([layer, torch.nn.Linear(10, 10)])
        outer.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    outer.fit(mnist["train"].take(256).map(scale).batch(64), epochs=1, verbose=0)
    distsave.saved_model.save(outer, tmp_path / "outer")
    x = torch.rand(3, 1, 28, 28)
    expected = outer.predict(x).cpu()
    for device in ("cpu", "cuda:0"):
        with distsave.OneDeviceStrategy(device).scope():
            served = distsave.saved_model.load(tmp_path / "outer").signatures["serving_default"](x)
        torch.testing.assert_close(served["output_0"].cpu(), expected, rtol=1e-4, atol=1e-4)


def test_captured_step_matches_the_eager_step(mnist, train_steps):
    initial = state_of(cnn_model())
    captured, fast = _train(mnist, jit_compile=True)  # 15 full batches + one of 40, per epoch
    assert isinstance(train_steps[0], steps.CapturedTrainStep) and train_steps[0].replays > 0
    assert train_steps[0].graph is None  # released when fit ends
    eager, slow = _train(mnist, jit_compile=False)
    assert type(train_steps[1]) is steps.TrainStep
    assert_every_weight_moved(state_of(captured), initial)
    assert isinstance(captured.optimizer, torch.optim.Adam)
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(captured.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key in slow.history:
        assert fast.history[key] == pytest.approx(slow.history[key], rel=1e-4)
    assert all(not group["capturable"] for group in captured.optimizer.param_groups)


def test_model_trained_on_the_fast_path_saves_and_loads_like_any_other(mnist, tmp_path, train_steps):
    model, _ = _train(mnist, jit_compile="auto")
    assert train_steps[0].replays > 0  # the fast path ran
    images = next(iter(mnist["test"].take(256).map(scale).batch(256)))[0]
    expected = model.predict(images).cpu()
    model.save(tmp_path / "m")
    assert '"capturable": false' in (tmp_path / "m/manifest.json").read_text()
    with distsave.OneDeviceStrategy("cpu").scope():
        restored = distsave.load_model(tmp_path / "m")
    torch.testing.assert_close(restored.predict(images), expected, rtol=1e-4, atol=1e-4)
    with distsave.OneDeviceStrategy("cuda:0").scope():
        on_gpu = distsave.load_model(tmp_path / "m")
    assert torch.equal(on_gpu.predict(images).cpu(), expected)
    before = state_of(restored)
    restored.fit(mnist["train"].take(256).map(scale).batch(64), epochs=1, verbose=0)
    assert_every_weight_moved(state_of(restored), before)


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)

    def forward(self, x):
        x = self.linear(x.flatten(1))
        return x * 2 if x.sum().item() > 0 else x  # a sync: cannot be captured


def test_required_capture_that_fails_raises_with_the_reason(mnist):
    with distsave.OneDeviceStrategy("cuda:0").scope():
        model = distsave.Model(DataDependent())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", jit_compile=True)
    with pytest.raises(steps.CaptureError, match=r"jit_compile=True.*capture failed \("):
        model.fit(mnist["train"].take(640).map(scale).batch(64), epochs=1, verbose=0)


def test_capture_falls_back_to_eager_with_one_log_line(mnist, caplog):
    with distsave.OneDeviceStrategy("cuda:0").scope():
        model = distsave.Model(DataDependent())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    with caplog.at_level("WARNING"):
        history = model.fit(mnist["train"].take(640).map(scale).batch(64), epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert sum("cannot capture" in r.message for r in caplog.records) == 1
