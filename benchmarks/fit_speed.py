"""Training speed of the workflow's CNN: distsave ``fit`` against its peers, in one process.

Each way trains 2 epochs of MNIST with Adam; samples/s is measured on the second epoch, as
the samples that epoch really ran over its seconds. The ways run interleaved, ``--repeats``
times; every run is a line of ``benchmarks/results/fit_speed-*.jsonl`` (commit, card, versions,
date) and the tables show medians.

    python benchmarks/fit_speed.py --batch 64 1024            # on a GPU (peers need CUDA)
    python benchmarks/fit_speed.py --device cpu --batch 64    # typical loop vs fit on a CPU
    python benchmarks/fit_speed.py --cpu --tf-python /work/tf-venv/bin/python
        # the CPU comparison: TensorFlow's own fit (skipped without --tf-python), a plain
        # PyTorch loop over resident tensors, distsave fit, and distsave fit in bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

import distsave
from distsave.demo import workflow_cnn

from raw_log import RawLog  # benchmarks/ is the script's folder, hence on sys.path

EPOCHS = 2


def mnist_tensors() -> tuple[torch.Tensor, torch.Tensor, distsave.data.Dataset]:
    train = distsave.datasets.load("mnist", split="train")
    images, labels = next(iter(train.batch(60000)))
    return images.float() / 255, labels, train


def new_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*workflow_cnn()).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_accuracy(model: nn.Module, device: torch.device) -> float:
    images, labels = next(iter(distsave.datasets.load("mnist", split="test").batch(10000)))
    model.eval()
    with torch.no_grad():
        predictions = model(images.to(device).float() / 255).argmax(1).cpu()
    return (predictions == labels).double().mean().item()


def timed_epochs(run_epoch: Callable[[], int], device: torch.device) -> float:
    """Run EPOCHS epochs (each returns the samples it trained on); samples/s of the last one."""
    for epoch in range(EPOCHS):
        sync(device)
        start = time.perf_counter()
        samples = run_epoch()
        sync(device)
        seconds = time.perf_counter() - start
    return samples / seconds


def eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def typical_loop(images, labels, batch, device) -> float:
    """DataLoader over CPU tensors, eager step, as most PyTorch tutorials write it."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=batch, shuffle=True, pin_memory=device.type == "cuda")
    model = new_model(device)
    optimizer = torch.optim.Adam(model.parameters())

    def epoch():
        for x, y in loader:
            eager_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        return len(images)
    return timed_epochs(epoch, device), test_accuracy(model, device)


def device_eager(images, labels, batch, device) -> float:
    """Data moved to the device once, shuffled there, eager step."""
    x_all, y_all = images.to(device), labels.to(device)
    model = new_model(device)
    optimizer = torch.optim.Adam(model.parameters())

    def epoch():
        for rows in torch.randperm(len(x_all), device=device).split(batch):
            eager_step(model, optimizer, x_all[rows], y_all[rows])
        return len(x_all)
    return timed_epochs(epoch, device), test_accuracy(model, device)


def captured_graph(images, labels, batch, device) -> float:
    """The limit: forward, backward and Adam captured once as a CUDA graph, replayed per step."""
    x_all, y_all = images.to(device), labels.to(device)
    model = new_model(device)
    optimizer = torch.optim.Adam(model.parameters(), capturable=True)
    static_x, static_y = x_all[:batch].clone(), y_all[:batch].clone()

    def step():
        loss = nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def epoch():
        samples = 0
        for rows in torch.randperm(len(x_all), device=device).split(batch):
            if len(rows) < batch:
                continue  # the graph has static shapes; the limit skips the last partial batch
            static_x.copy_(x_all[rows])
            static_y.copy_(y_all[rows])
            graph.replay()
            samples += batch  # so the rate counts only the samples it trained on
        return samples
    return timed_epochs(epoch, device), test_accuracy(model, device)


def lightning_fit(images, labels, batch, device) -> tuple[float, float] | None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = new_model(torch.device("cpu"))

        def training_step(self, batch_data, _):
            x, y = batch_data
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    class Timer(pl.Callback):
        def on_train_epoch_start(self, *_):
            sync(device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, *_):
            sync(device)
            self.rate = 60000 / (time.perf_counter() - self.start)

    timer = Timer()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=batch, shuffle=True)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="gpu" if device.type == "cuda" else "cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    module = Module()
    trainer.fit(module, loader)
    return timer.rate, test_accuracy(module.net.to(device), device)


def distsave_fit(train, batch, device, verbose: int = 1, **options) -> tuple[float, float]:
    """The workflow's code unchanged: map/cache/shuffle/batch, Adam, accuracy, progress bar."""
    pipeline = train.map(lambda image, label: (image.float() / 255, label)).cache().shuffle(10000).batch(batch)

    class Timer(distsave.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            sync(device)
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            sync(device)
            self.rate = 60000 / (time.perf_counter() - self.start)

    timer = Timer()
    with distsave.OneDeviceStrategy(str(device)).scope():
        torch.manual_seed(0)
        model = distsave.Sequential(workflow_cnn())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"], **options)
    model.fit(pipeline, epochs=EPOCHS, callbacks=[timer], verbose=verbose)
    return timer.rate, test_accuracy(model, device)


def distsave_bf16_fit(train, batch, device) -> tuple[float, float] | None:
    """distsave fit under bf16-mixed precision, where compile() takes ``precision``."""
    try:
        with distsave.OneDeviceStrategy(str(device)).scope():
            distsave.Sequential(workflow_cnn()).compile(loss="mse", optimizer="adam", precision="bf16-mixed")
    except TypeError:
        return None
    return distsave_fit(train, batch, device, verbose=0, precision="bf16-mixed")


def plain_bf16_loop(images, labels, batch, device) -> tuple[float, float]:
    """The plain loop with forward and loss under bf16 autocast (float32 weights and Adam)."""
    x_all, y_all = images.to(device), labels.to(device)
    model = new_model(device)
    optimizer = torch.optim.Adam(model.parameters())

    def epoch():
        for rows in torch.randperm(len(x_all), device=device).split(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x_all[rows]), y_all[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return len(x_all)
    return timed_epochs(epoch, device), test_accuracy(model, device)


def mnist_npz(folder: Path) -> Path:
    """MNIST as uint8 arrays for the TensorFlow peer, the same bytes distsave trains on."""
    import numpy as np

    path = folder / "mnist.npz"
    splits = {name: next(iter(distsave.datasets.load("mnist", split=name).batch(60000)))
              for name in ("train", "test")}
    np.savez(path, **{f"{name}_{part}": tensor[:, 0].numpy() if part == "x" else tensor.numpy()
                      for name, (images, labels) in splits.items()
                      for part, tensor in (("x", images), ("y", labels))})
    return path


def tensorflow_fit(tf_python: str, data: Path, batch: int) -> tuple[float, float]:
    """TensorFlow 2 + tf_keras, the seed's model, compile and fit, in its own venv's process."""
    peer = Path(__file__).with_name("tf_peer.py")
    done = subprocess.run([tf_python, str(peer), "fit", str(data), "--epochs", str(EPOCHS),
                           "--batch", str(batch)], capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"the TensorFlow peer failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["samples_per_second"], result["test_accuracy"]


TF, PLAIN, FIT, FIT_BF16 = ("TensorFlow 2.21 + tf_keras fit (seed)", "plain PyTorch loop, resident tensors",
                            "distsave fit", "distsave fit, bf16-mixed")


def cpu_round(images, labels, train, batch, tf: tuple[str, Path] | None) -> dict:
    """The CPU comparison, every way once in a fixed order (rounds interleave the ways)."""
    device = torch.device("cpu")
    results: dict[str, tuple[float, float] | None] = {}
    if tf:
        results[TF] = tensorflow_fit(tf[0], tf[1], batch)
    results[PLAIN] = device_eager(images, labels, batch, device)
    results[FIT] = distsave_fit(train, batch, device, verbose=0)  # TensorFlow's runs verbose=0 too
    results[FIT_BF16] = distsave_bf16_fit(train, batch, device)
    results["plain PyTorch loop, bf16 autocast"] = plain_bf16_loop(images, labels, batch, device)
    return results


def cpu_main(args: argparse.Namespace) -> None:
    images, labels, train = mnist_tensors()
    device = torch.device("cpu")
    log = RawLog("fit_speed_cpu", device)
    tf = None
    with tempfile.TemporaryDirectory() as folder:
        if args.tf_python:
            tf = (args.tf_python, mnist_npz(Path(folder)))
        print(f"# CPU fit speed: {log.context['card']}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, commit {log.context['commit'][:10]}, {log.context['date']}; "
              f"raw log {log.path}" + ("" if tf else "; TensorFlow skipped (no --tf-python)"))
        for repeat in range(args.repeats):
            for batch in args.batch:
                for way, result in cpu_round(images, labels, train, batch, tf).items():
                    rate, accuracy = result if result else (None, None)
                    log.write(way=way, batch=batch, repeat=repeat, samples_per_second=rate,
                              test_accuracy=accuracy)
                    print(f"  round {repeat + 1}, batch {batch}: {way}: "
                          + (f"{rate:,.0f} samples/s, accuracy {accuracy:.4f}" if result else "n/a"), flush=True)
    print_tables(log, args, f"{EPOCHS} epochs, ", (TF, "vs TensorFlow", "n/a"), (PLAIN, "vs plain loop", ""))


TYPICAL, LIMIT = "typical loop (DataLoader + eager step)", "captured CUDA graph step (limit)"


def one_round(images, labels, train, batch, device, lightning: bool) -> dict[str, tuple[float, float] | None]:
    """Every way once, in a fixed order (rounds interleave the ways)."""
    results: dict[str, tuple[float, float] | None] = {TYPICAL: typical_loop(images, labels, batch, device)}
    if device.type == "cuda":
        results["data on device, eager step"] = device_eager(images, labels, batch, device)
        results[LIMIT] = captured_graph(images, labels, batch, device)
    if lightning:
        results["Lightning Trainer.fit"] = lightning_fit(images, labels, batch, device)
    results["distsave fit"] = distsave_fit(train, batch, device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are shown)")
    parser.add_argument("--skip-lightning", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison against TensorFlow")
    parser.add_argument("--tf-python", help="python of a venv with tensorflow-cpu and tf-keras (--cpu)")
    args = parser.parse_args()
    if args.cpu:
        cpu_main(args)
        return
    device = torch.device(args.device)
    images, labels, train = mnist_tensors()
    log = RawLog("fit_speed", device)
    print(f"# fit speed: {log.context['card']}, torch {torch.__version__}, commit {log.context['commit'][:10]}, "
          f"{log.context['date']}; raw log {log.path}")
    for repeat in range(args.repeats):
        for batch in args.batch:
            for way, result in one_round(images, labels, train, batch, device, not args.skip_lightning).items():
                rate, accuracy = result if result else (None, None)
                log.write(way=way, batch=batch, repeat=repeat, samples_per_second=rate, test_accuracy=accuracy)
    print_tables(log, args, "", (TYPICAL, "vs typical loop", ""), (LIMIT, "vs captured graph", ""))


def print_tables(log, args, what: str, *bases: tuple[str, str, str]) -> None:
    """One markdown table per batch size: medians, and each way's ratio to each ``(way, column
    title, text when that way did not run)`` of ``bases``."""
    rates = log.medians(("batch", "way"), "samples_per_second")
    accuracies = log.medians(("batch", "way"), "test_accuracy")
    for batch in args.batch:
        print(f"\n## {batch} examples per step, {what}medians of {args.repeats} interleaved runs\n")
        print("| way of training | samples/s | " + " | ".join(title for _, title, _ in bases) + " | test accuracy |")
        print("|---|---:|" + "---:|" * len(bases) + "---:|")
        for (b, way), (rate, _) in rates.items():
            if b != batch:
                continue
            ratios = []
            for base, _, missing in bases:
                reference = rates.get((batch, base), (None,))[0]
                ratios.append(f"{rate / reference:.2f}x" if reference else missing)
            print(f"| {way} | {rate:,.0f} | " + " | ".join(ratios) + f" | {accuracies[(b, way)][0]:.4f} |")


if __name__ == "__main__":
    main()
