"""MirroredStrategy where the program cannot be run again: a Jupyter kernel, pytest, python -c.

The replicas are forked per call; these tests run the seed's workflow from a real kernel
(nbclient) and check that a dying replica fails the call instead of hanging it.
"""

import textwrap

import pytest

from tests.conftest import ROOT, run_python


SETUP = """
import torch, distsave
from distsave.demo import workflow_cnn
torch.backends.cudnn.allow_tf32 = False  # on GPUs: fp32 convolutions, to compare with fp32 tolerance
strategy = distsave.MirroredStrategy(devices=DEVICES)
mnist = distsave.datasets.load("mnist")
scale = lambda image, label: (image.float() / 255, label)
def build(optimizer="adam"):
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn())
    model.compile(loss="sparse_categorical_crossentropy", optimizer=optimizer, metrics=["accuracy"])
    return model
with strategy.scope():
    model = build()
"""
FIT = """
history = model.fit(mnist["train"].take(2048).map(scale).batch(64), epochs=1)
logs = model.evaluate(mnist["test"].take(512).map(scale).batch(128), return_dict=True)
model.save(ARTIFACT)
"""
CHECK = """
images = next(iter(mnist["test"].take(64).map(scale).batch(64)))[0]
expected = model.predict(images)  # forked too, so before this kernel touches a GPU itself
with strategy.scope():  # SGD: Adam would magnify fp32 summation-order noise
    mirrored = build("sgd")
mirrored.fit(mnist["train"].take(1024).map(scale).batch(64), epochs=1, verbose=0)
single = build("sgd")  # one replica, the whole global batch of 64
single.fit(mnist["train"].take(1024).map(scale).batch(64), epochs=1, verbose=0)
for name, tensor in single.state_dict().items():
    assert not torch.equal(tensor, build("sgd").state_dict()[name]), name  # it trained
    tolerance = 1e-5 if DEVICES[0] == "cpu" else 1e-4  # GPUs: convolution algorithms differ by batch
    torch.testing.assert_close(mirrored.state_dict()[name], tensor.cpu(), rtol=tolerance, atol=tolerance / 10,
                               msg=name)
assert strategy.forks and strategy.num_replicas_in_sync == len(DEVICES)
assert logs["accuracy"] > 0.5, logs
restored = distsave.load_model(ARTIFACT)
torch.testing.assert_close(restored.predict(images).cpu(), expected, rtol=1e-4, atol=1e-4)
print("seed workflow ok", history.history["loss"])
"""


def run_notebook(tmp_path, devices: list[str]) -> str:
    """The seed's workflow as notebook cells, executed by a fresh IPython kernel."""
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    prelude = f"DEVICES = {devices!r}\nARTIFACT = {str(tmp_path / 'model')!r}\n"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(prelude + SETUP),
                                               nbformat.v4.new_code_cell(FIT),
                                               nbformat.v4.new_code_cell(CHECK)])
    client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = notebook.cells[-1].outputs
    return "".join(o.get("text", "") for o in outputs)


def test_seed_workflow_from_a_jupyter_kernel_with_two_cpu_replicas(tmp_path):
    assert "seed workflow ok" in run_notebook(tmp_path, ["cpu", "cpu"])


def test_python_c_forks_its_replicas_and_a_dying_replica_fails_the_call():
    code = textwrap.dedent("""
        import os, torch, distsave
        strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
        class Dies(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(4, 2)
            def forward(self, x):
                if strategy.replica_id == 1:
                    os._exit(7)  # a replica killed mid-fit
                return self.linear(x)
        with strategy.scope():
            model = distsave.Model(Dies())
            model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
        try:
            model.fit(torch.rand(64, 4), torch.randint(0, 2, (64,)), batch_size=16, verbose=0)
        except distsave.strategies.forked.ForkedReplicasError as error:
            print("failed as expected:", str(error).splitlines()[0])
    """)
    result = run_python(["-c", code], timeout=120)
    assert "failed as expected: Replica 1 of 2" in result.stdout


def test_under_pytest_the_replicas_are_forked_not_a_second_pytest(tmp_path):
    case = tmp_path / "case_forked.py"
    case.write_text(textwrap.dedent("""
        import torch, distsave
        def test_fit():
            strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
            assert strategy.forks
            with strategy.scope():
                model = distsave.Sequential([torch.nn.Linear(4, 2)])
                model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
            history = model.fit(torch.rand(64, 4), torch.randint(0, 2, (64,)), batch_size=16, verbose=0)
            assert len(history.history["loss"]) == 1 and model.step == 4
    """))
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(case)], timeout=120)
    assert "1 passed" in result.stdout


def test_a_forking_controller_saves_without_exporting_itself_and_forks_again(tmp_path):
    """torch.export initialises CUDA where it can, and forked replicas cannot use CUDA after that:
    a controller's save leaves the export to a helper process (here torch.export fails in it)."""
    code = textwrap.dedent(f"""
        import torch, distsave
        strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
        assert strategy.forks
        with strategy.scope():
            model = distsave.Sequential([torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)])
            model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
        model.fit(torch.rand(64, 4), torch.randint(0, 2, (64,)), batch_size=16, verbose=0)
        def no_export(*args, **kwargs):
            raise AssertionError("torch.export ran in the forking controller")
        torch.export.export = no_export
        model.save({str(tmp_path / 'model')!r})
        x = torch.rand(8, 4)
        expected = model.predict(x)  # forked again after the save
        served = distsave.saved_model.load({str(tmp_path / 'model')!r}).signatures["serving_default"](x)
        torch.testing.assert_close(served["output_0"], expected)
        print("saved and forked again")
    """)
    result = run_python(["-c", code], timeout=120)
    assert "saved and forked again" in result.stdout, result.stderr[-2000:]
