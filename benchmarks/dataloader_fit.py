"""A DataLoader-fed distsave ``fit`` against the hand-written DataLoader loop it replaces.

Both ways read MNIST through the same ``torch.utils.data.DataLoader`` (shuffle, ``--workers``,
pinned memory on a GPU) and train the workflow's CNN with Adam, tracking loss and accuracy on
the device; samples/s is the second epoch's. Ways run interleaved ``--repeats`` times; each
run is a line of ``benchmarks/results/dataloader_fit-*.jsonl`` and the table shows medians and
the ratio fit / loop (goal: >= 0.95).

    python benchmarks/dataloader_fit.py --device cpu --subset 8192 --repeats 3
    python benchmarks/dataloader_fit.py --device cuda --batch 64 256 --workers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distsave
from distsave.demo import workflow_cnn

from raw_log import RawLog  # benchmarks/ is the script's folder, hence on sys.path

EPOCHS = 2


def make_loader(subset: int, batch: int, workers: int, device: torch.device) -> DataLoader:
    train = distsave.datasets.load("mnist", split="train")
    images, labels = next(iter(train.batch(60000)))
    images, labels = images[:subset].float() / 255, labels[:subset]
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(loader: DataLoader, device: torch.device) -> float:
    """The loop a PyTorch user writes: move, forward, loss, backward, step; sums on the device."""
    torch.manual_seed(0)
    model = nn.Sequential(*workflow_cnn()).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    speed = 0.0
    for _ in range(EPOCHS):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        sync(device)
        start, samples = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            samples += len(y)
        print(f"    loop: loss {loss_sum.item() / samples:.4f} accuracy {correct.item() / samples:.4f}")
        sync(device)
        speed = samples / (time.perf_counter() - start)
    return speed


def distsave_fit(loader: DataLoader, device: torch.device) -> float:
    """``model.fit(loader)``, one epoch per call so each epoch is timed alone."""
    torch.manual_seed(0)
    with distsave.OneDeviceStrategy(device).scope():
        model = distsave.Sequential(workflow_cnn())
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    speed = 0.0
    for _ in range(EPOCHS):
        sync(device)
        start = time.perf_counter()
        history = model.fit(loader, epochs=1, verbose=0)
        sync(device)
        speed = len(loader.dataset) / (time.perf_counter() - start)
        print(f"    fit:  loss {history.history['loss'][0]:.4f} accuracy {history.history['accuracy'][0]:.4f}")
    return speed


WAYS = {"hand_loop": hand_loop, "distsave_fit": distsave_fit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--subset", type=int, default=60000, help="training examples used")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    log = RawLog("dataloader_fit", device)
    print(f"# DataLoader fit vs hand loop: {log.context['card']}, torch {torch.__version__}, "
          f"commit {log.context['commit'][:10]}; raw log {log.path}")
    for repeat in range(args.repeats):
        for batch in args.batch:
            loader = make_loader(args.subset, batch, args.workers, device)
            order = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
            for way in order:
                speed = WAYS[way](loader, device)
                print(f"  repeat {repeat} batch {batch} {way}: {speed:,.0f} samples/s", flush=True)
                log.write(way=way, batch=batch, subset=args.subset, workers=args.workers,
                          repeat=repeat, samples_per_s=speed)
    medians = log.medians(("batch", "way"), "samples_per_s")
    print("\n| batch | hand loop samples/s | distsave fit samples/s | fit / loop |")
    print("|---|---|---|---|")
    for batch in args.batch:
        loop, _ = medians[(batch, "hand_loop")]
        fit, _ = medians[(batch, "distsave_fit")]
        print(f"| {batch} | {loop:,.0f} | {fit:,.0f} | {fit / loop:.3f} |")


if __name__ == "__main__":
    main()
