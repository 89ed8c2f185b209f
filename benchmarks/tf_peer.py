"""TensorFlow's side of the CPU benchmarks, run by the Python of a separate TensorFlow venv.

Not imported by distsave: `fit_speed.py --cpu` and `inference_cpu.py` start it with
``--tf-python`` and read one JSON line from its stdout. MNIST comes from an ``.npz`` the caller
wrote (uint8 images N x 28 x 28, int64 labels), so both sides train on the same bytes.

    python tf_peer.py fit MNIST.npz --epochs 2 --batch 64
    python tf_peer.py save MNIST.npz DIR              # train 1 epoch, tf.saved_model.save
    python tf_peer.py serve DIR MNIST.npz             # cold start, serving latency, 10k inference
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf_keras: the seed's Keras 2 API


def _data(path: str):
    import numpy as np

    arrays = np.load(path)
    return arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]


def _seed_model(tf):
    """The tutorial's CNN and compile call, as the seed wrote them."""
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(32, 3, activation="relu", input_shape=(28, 28, 1)),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=tf.keras.optimizers.Adam(), metrics=["accuracy"])
    return model


def _pipeline(tf, x, y, batch: int, train: bool):
    def scale(image, label):
        return tf.cast(image, tf.float32)[..., None] / 255.0, label

    ds = tf.data.Dataset.from_tensor_slices((x, y)).map(scale).cache()
    return (ds.shuffle(10000) if train else ds).batch(batch)


def fit(args: argparse.Namespace) -> dict:
    import tensorflow as tf

    train_x, train_y, test_x, test_y = _data(args.data)

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rate = len(train_x) / (time.perf_counter() - self.start)

    tf.keras.utils.set_random_seed(0)
    model, timer = _seed_model(tf), Timer()
    model.fit(_pipeline(tf, train_x, train_y, args.batch, True), epochs=args.epochs, verbose=0,
              callbacks=[timer])
    _, accuracy = model.evaluate(_pipeline(tf, test_x, test_y, 1000, False), verbose=0)
    return {"samples_per_second": timer.rate, "test_accuracy": float(accuracy)}


def save(args: argparse.Namespace) -> dict:
    import tensorflow as tf

    train_x, train_y, _, _ = _data(args.data)
    tf.keras.utils.set_random_seed(0)
    model = _seed_model(tf)
    model.fit(_pipeline(tf, train_x, train_y, 64, True), epochs=1, verbose=0)
    tf.saved_model.save(model, args.directory)
    return {"saved": args.directory}


def serve(args: argparse.Namespace) -> dict:
    """Cold start from the interpreter's start (the caller passes it), then steady latencies."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(args.directory)
    signature = loaded.signatures["serving_default"]
    key = next(iter(signature.structured_input_signature[1]))  # signatures take keyword inputs

    def infer(x):
        return signature(**{key: x})

    _, _, test_x, test_y = _data(args.data)
    images = tf.constant(test_x[..., None].astype(np.float32) / 255.0)
    first = infer(images[:64])
    cold = time.time() - args.started
    assert len(first) == 1
    latencies = []
    for _ in range(args.calls):
        start = time.perf_counter()
        infer(images[:64])
        latencies.append(time.perf_counter() - start)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((test_x, test_y)).map(
            lambda x, y: (tf.cast(x, tf.float32)[..., None] / 255.0, y)).batch(64))
    start = time.perf_counter()
    correct = 0
    for batch_x, batch_y in dataset:
        logits = strategy.run(lambda x: next(iter(infer(x).values())), args=(batch_x,))
        logits = strategy.gather(logits, axis=0)
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == batch_y, tf.int32)))
    distributed = time.perf_counter() - start
    return {"cold_start_s": cold, "serving_median_ms": 1000 * float(np.median(latencies)),
            "distributed_10k_s": distributed, "accuracy": correct / len(test_y),
            "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """VmHWM: this program's peak (ru_maxrss would count the parent it was forked from)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit")
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p = sub.add_parser("save")
    p.add_argument("data")
    p.add_argument("directory")
    p = sub.add_parser("serve")
    p.add_argument("directory")
    p.add_argument("data")
    p.add_argument("--started", type=float, default=time.time())
    p.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    result = {"fit": fit, "save": save, "serve": serve}[args.command](args)
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
