"""`distsave demo`: TensorFlow's "save and load a model with a distribution strategy" workflow,
step by step, on bundled MNIST, ending with a table of every step's result and whether it passed.

``quick=True`` (``distsave demo --quick``) runs the same steps on a few hundred training steps,
for CI; the exit code is non-zero when any step failed its check."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import saved_model
from .data import datasets
from .layers import SavedModelLayer
from .saving import SaveError, load_model, register_serializable
from .strategies import MirroredStrategy, OneDeviceStrategy
from .training import Model, Sequential

__all__ = ["run_demo", "workflow_cnn"]


def workflow_cnn() -> list[nn.Module]:
    """The workflow's CNN: 347,146 parameters."""
    return [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(5408, 64), nn.ReLU(), nn.Linear(64, 10)]


@register_serializable(package="distsave_demo")
class SubclassedCNN(Model):
    """A subclassed model built without saying what inputs it takes."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(5408, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class _Row:
    step: str
    result: str
    seconds: float
    size: str = ""
    passed: bool = False


_SAME = 1e-4  # outputs of one model computed two ways (batching, replicas, devices) agree this well
_QUICK_TRAIN, _QUICK_TEST = 12_800, 2_000  # 200 steps of 64 per replica-batch: the same rows, in CI


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 2**20:.2f} MiB"


def _scores(logs: dict[str, float]) -> str:
    return f"loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}"


class _Table:
    def __init__(self, echo: bool) -> None:
        self.rows: list[_Row] = []
        self.echo = echo

    @contextmanager
    def step(self, name: str) -> Any:
        row = _Row(name, "", 0.0)
        start = time.perf_counter()
        yield row
        row.seconds = time.perf_counter() - start
        self.rows.append(row)
        if self.echo:
            print(f"[{len(self.rows)}] {row.step}: {row.result} ({row.seconds:.1f}s)\n", flush=True)

    def print(self) -> None:
        widths = [max(len(r.step) for r in self.rows), max(len(r.result) for r in self.rows)]
        line = (f"| {'step':<{widths[0]}} | {'result':<{widths[1]}} | {'time':>7} | {'artifact':>9} "
                f"| {'check':<5} |")
        print("\n" + line)
        print("|" + "|".join("-" * (w + 2) for w in (*widths, 7, 9, 5)) + "|")
        for r in self.rows:
            print(f"| {r.step:<{widths[0]}} | {r.result:<{widths[1]}} | {r.seconds:>6.1f}s | {r.size:>9} "
                  f"| {'ok' if r.passed else 'FAIL':<5} |")
        failed = sum(not r.passed for r in self.rows)
        print(f"\n{len(self.rows) - failed} of {len(self.rows)} steps passed their checks.")

    @property
    def all_passed(self) -> bool:
        return all(r.passed for r in self.rows)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu() - b.detach().cpu()).abs().max().item()


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return (outputs.argmax(-1) == labels).double().mean().item()


def run_demo(cpu_replicas: int | None = None, epochs: int = 2, workdir: str | Path = "distsave-demo",
             log: Callable[[str], None] = print, quick: bool = False) -> int:
    """Run every step of the workflow; returns a process exit code (1 if a step failed its check).

    ``quick`` trains on the first 12,800 examples for one epoch and tests on 2,000: every step
    still runs, with an accuracy bar of 0.8 instead of 0.97.
    """
    if cpu_replicas is None and torch.cuda.is_available():
        strategy = MirroredStrategy()
    else:  # one CPU replica already uses every core; more only share them (--cpu-replicas N)
        strategy = MirroredStrategy(devices=["cpu"] * (cpu_replicas or 1))
    workdir = Path(workdir)
    chief = strategy.is_chief
    table = _Table(echo=chief)
    if chief:
        log(f"distsave demo: {strategy!r}, torch {torch.__version__}, artifacts in {workdir}/")

    splits, info = datasets.load("mnist", with_info=True, as_supervised=True)
    global_batch = 64 * strategy.num_replicas_in_sync

    def scale(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image.float() / 255, label

    train_split, test_split = splits["train"], splits["test"]
    if quick:
        epochs, train_split, test_split = 1, train_split.take(_QUICK_TRAIN), test_split.take(_QUICK_TEST)
    train_examples = _QUICK_TRAIN if quick else info.splits["train"]
    good_accuracy = 0.8 if quick else 0.97
    train = train_split.map(scale).cache().shuffle(10000).batch(global_batch)
    test = test_split.map(scale).cache().batch(global_batch)

    with table.step(f"fit under MirroredStrategy x{strategy.num_replicas_in_sync} "
                    f"({strategy.device.type}), {epochs} epochs") as row:
        with strategy.scope():
            model = Sequential(workflow_cnn())
            model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
        start = time.perf_counter()
        history = model.fit(train, epochs=epochs, verbose=int(chief))
        rate = epochs * train_examples / (time.perf_counter() - start)
        row.result = _scores({k: v[-1] for k, v in history.history.items()}) + f" (train), {rate:,.0f} samples/s"
        row.passed = len(history.history["loss"]) == epochs and history.history["loss"][-1] < 1.0
    with table.step("evaluate on the test set") as row:
        before = model.evaluate(test, verbose=0, return_dict=True)
        row.result = _scores(before)
        row.passed = before["accuracy"] >= good_accuracy
    model_dir = workdir / "mnist_model"
    with table.step("model.save (every replica calls it)") as row:
        model.save(model_dir)
        row.result, row.size = "saved once, atomically", _size(model_dir)
        row.passed = (model_dir / "manifest.json").is_file()

    with table.step("distributed inference: strategy.run(serving_default)") as row:
        with strategy.scope():
            loaded = saved_model.load(model_dir)
        serve = loaded.signatures[saved_model.DEFAULT_SIGNATURE]
        outputs, labels = [], []
        for images, batch_labels in strategy.experimental_distribute_dataset(test):
            result = strategy.run(serve, args=(images,))
            outputs.append(strategy.gather(result["output_0"]))
            labels.append(strategy.gather(batch_labels))
        distributed = torch.cat(outputs).cpu()
        difference = _max_diff(distributed, model.predict(test))
        row.result = (f"accuracy {_accuracy(distributed, torch.cat(labels).cpu()):.4f}, "
                      f"max abs diff vs model.predict {difference:.1e}")
        row.passed = difference <= _SAME
    if not chief:
        return 0 if table.all_passed else 1

    with table.step('load_model under OneDeviceStrategy("cpu"), evaluate') as row:
        with OneDeviceStrategy("cpu").scope():
            restored = load_model(model_dir)
        after = restored.evaluate(test, verbose=0, return_dict=True)
        same = after["accuracy"] == before["accuracy"] and math.isclose(after["loss"], before["loss"],
                                                                         rel_tol=1e-6)
        row.result = _scores(after) + (" (as before saving)" if same else " (DIFFERS from before saving)")
        row.passed = same
    with table.step("continue training the restored model, 1 epoch") as row:
        history = restored.fit(train, epochs=1, verbose=1)
        row.result = _scores({k: v[-1] for k, v in history.history.items()}) + f" (train, epoch {restored.epoch})"
        row.passed = restored.epoch == epochs + 1 and history.history["loss"][-1] < 1.0

    exported = workdir / "mnist_saved_model"

    def embed(images: torch.Tensor) -> torch.Tensor:
        for layer in restored.layers[:-1]:
            images = layer(images)
        return images

    with table.step("saved_model.save: serving_default + embed signatures") as row:
        saved_model.save(restored, exported, signatures={
            "serving_default": restored,
            "embed": saved_model.Signature(embed, output_names=["embedding"])})
        row.result, row.size = "2 programs (JSON) sharing one weights file", _size(exported)
        row.passed = sorted(p.name for p in (exported / "signatures").glob("*.json")) == [
            "embed.json", "serving_default.json"]
    with table.step("saved_model.load, serving_default on a test batch") as row:
        reloaded = saved_model.load(exported)
        images, batch_labels = next(iter(test))
        logits = reloaded.signatures["serving_default"](images)["output_0"].cpu()
        difference = _max_diff(logits, restored.predict(images))
        row.result = f"accuracy {_accuracy(logits, batch_labels):.4f}, max abs diff vs model.predict {difference:.1e}"
        row.passed = difference <= _SAME

    with table.step("SavedModelLayer(embed, trainable=True) transfer, 1 epoch") as row:
        transfer = Sequential([SavedModelLayer(reloaded, signature="embed", trainable=True),
                               nn.Linear(64, 10)])
        transfer.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
        transfer.fit(train, epochs=1, verbose=1)
        tuned = transfer.evaluate(test, verbose=0, return_dict=True)
        row.result = _scores(tuned) + " (test)"
        row.passed = tuned["accuracy"] >= good_accuracy
    with table.step("the transfer model through both APIs") as row:
        transfer.save(workdir / "transfer_model")
        saved_model.save(transfer, workdir / "transfer_saved_model")
        again = load_model(workdir / "transfer_model").evaluate(test, verbose=0, return_dict=True)
        served = saved_model.load(workdir / "transfer_saved_model").signatures["serving_default"](images)
        difference = _max_diff(served["output_0"], transfer.predict(images))
        row.result = f"load_model: {_scores(again)}; saved_model max abs diff {difference:.1e}"
        row.size = _size(workdir / "transfer_model")
        row.passed = again["accuracy"] == tuned["accuracy"] and difference <= _SAME

    with table.step("mixed API: model.save dir via saved_model.load") as row:
        mixed = saved_model.load(model_dir)
        row.result = f"signatures {sorted(mixed.signatures)}, variables {len(mixed.variables)}"
        row.passed = "serving_default" in mixed.signatures and set(mixed.variables) == set(model.state_dict())

    with table.step("model without defined inputs") as row:
        subclassed = SubclassedCNN()
        try:
            subclassed.save(workdir / "subclassed")
            refused = None
        except SaveError as error:
            refused = f"model.save refused ({type(error).__name__})"
        saved_model.save(subclassed, workdir / "subclassed_weights_only")
        no_signatures = saved_model.load(workdir / "subclassed_weights_only").signatures
        subclassed(torch.zeros(1, 1, 28, 28))
        subclassed.save(workdir / "subclassed")
        rebuilt = load_model(workdir / "subclassed")
        row.result = (f"{refused or 'saved?!'}; saved_model.save: {len(no_signatures)} signatures; after "
                      f"one call, save + load_model work ({rebuilt.inputs[0].describe()})")
        row.passed = refused is not None and not no_signatures and isinstance(rebuilt, SubclassedCNN)
    table.print()
    return 0 if table.all_passed else 1
