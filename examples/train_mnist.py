"""Train the workflow's CNN on MNIST under a strategy, the way TensorFlow's tutorial does.

    python examples/train_mnist.py --cpu-replicas 2        # distsave starts the 2nd replica
    torchrun --nproc_per_node 2 examples/train_mnist.py    # torchrun starts both
    python examples/train_mnist.py --one-device cuda:0     # one device, no process group
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

import distsave
from distsave.demo import workflow_cnn


def parameter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EpochTimer(distsave.Callback):
    """Seconds per epoch (the first includes warm-up: caching, kernel selection, capture)."""

    def __init__(self):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-replicas", type=int, help="MirroredStrategy over N CPU replicas")
    parser.add_argument("--one-device", help="OneDeviceStrategy on this device instead")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-replica-batch", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=None, help="use only the first N")
    parser.add_argument("--seed", type=int, help="fix initial weights and shuffling")
    parser.add_argument("--save", help="model.save here after training")
    parser.add_argument("--report", help="write a JSON report per replica to REPORT.<replica>.json")
    args = parser.parse_args()

    if args.one_device:
        strategy = distsave.OneDeviceStrategy(args.one_device)
    elif args.cpu_replicas:
        strategy = distsave.MirroredStrategy(devices=["cpu"] * args.cpu_replicas)
    else:
        strategy = distsave.MirroredStrategy()
    print(f"replica {strategy.replica_id}: {strategy!r}", flush=True)

    datasets, info = distsave.datasets.load("mnist", with_info=True, as_supervised=True)
    batch = args.per_replica_batch * strategy.num_replicas_in_sync

    def scale(image, label):
        return image.float() / 255, label

    train = datasets["train"]
    if args.train_examples:
        train = train.take(args.train_examples)
    train = train.map(scale).cache().shuffle(10000, seed=args.seed).batch(batch)
    test = datasets["test"].map(scale).batch(batch)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    with strategy.scope():
        model = distsave.Sequential(workflow_cnn())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(train, epochs=args.epochs, verbose=int(strategy.is_chief), callbacks=[timer])
    loss, accuracy = model.evaluate(test, verbose=int(strategy.is_chief))
    rate = (args.train_examples or info.splits["train"]) / timer.seconds[-1]
    if strategy.is_chief:
        print(f"test accuracy {accuracy:.4f}; last epoch {rate:,.0f} samples/s", flush=True)
    if args.save:
        model.save(args.save)
    if args.report:
        report = {"replica": strategy.replica_id, "replicas": strategy.num_replicas_in_sync,
                  "test_loss": loss, "test_accuracy": accuracy, "samples_per_second": rate,
                  "parameters": parameter_digest(model), "device": str(strategy.device)}
        Path(f"{args.report}.{strategy.replica_id}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
