"""Inference on a CPU, distsave against TensorFlow in the same run (not in CI).

For each side, in a fresh process per round: cold start (from the process's start to the first
prediction of ``serving_default`` of a loaded artifact: interpreter, imports, load, first call),
then the median of 200 ``serving_default`` calls at batch 64, then distributed inference over
the 10,000 MNIST test images (``experimental_distribute_dataset`` + ``strategy.run`` +
``gather``, one CPU replica), and the process's peak RSS. Rounds interleave the sides; the
table shows medians. TensorFlow runs from its own venv (``--tf-python``), skipped without it.

    python benchmarks/inference_cpu.py --tf-python /work/tf-venv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(artifact: str, started: float, calls: int) -> dict:
    """distsave's side, in a fresh process (``started`` is when the parent spawned it)."""
    import torch

    import distsave

    loaded = distsave.saved_model.load(artifact)
    serve = loaded.signatures["serving_default"]
    test = distsave.datasets.load("mnist", split="test")
    images = next(iter(test.batch(64)))[0].float() / 255
    first = serve(images)
    cold = time.time() - started
    assert first["output_0"].shape == (64, 10)
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        serve(images)
        latencies.append(time.perf_counter() - start)
    strategy = distsave.MirroredStrategy(devices=["cpu"])
    pipeline = test.map(lambda image, label: (image.float() / 255, label)).batch(64)
    start = time.perf_counter()
    with strategy.scope():
        correct = 0
        for batch, labels in strategy.experimental_distribute_dataset(pipeline):
            logits = strategy.gather(strategy.run(serve, args=(batch,))["output_0"])
            correct += int((logits.argmax(1) == strategy.gather(labels)).sum())
    distributed = time.perf_counter() - start
    return {"cold_start_s": cold, "serving_median_ms": 1000 * statistics.median(latencies),
            "distributed_10k_s": distributed, "accuracy": correct / 10000,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def peak_rss_mib() -> float:
    """VmHWM: this program's peak (ru_maxrss would count the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{command[:3]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _artifacts(folder: Path, tf_python: str | None) -> tuple[Path, Path | None]:
    """The workflow's CNN trained for one epoch by each side, saved with its low-level API."""
    import torch

    import distsave
    from distsave.demo import workflow_cnn

    train = distsave.datasets.load("mnist", split="train").map(lambda i, l: (i.float() / 255, l))
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn())
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(train.cache().shuffle(10000).batch(64), epochs=1, verbose=0)
    distsave.saved_model.save(model, folder / "distsave_model")
    if not tf_python:
        return folder / "distsave_model", None
    sys.path.insert(0, str(HERE))
    from fit_speed import mnist_npz

    data = mnist_npz(folder)
    _run([tf_python, str(HERE / "tf_peer.py"), "save", str(data), str(folder / "tf_model")])
    return folder / "distsave_model", folder / "tf_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tf-python", help="python of a venv with tensorflow-cpu and tf-keras")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--child", nargs=2, metavar=("ARTIFACT", "STARTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.calls)), flush=True)
        return
    passive = "distsave, OMP_WAIT_POLICY=PASSIVE"
    results: dict[str, list[dict]] = {"distsave": [], passive: [], "TensorFlow 2.21": []}
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = _artifacts(Path(folder), args.tf_python)
        data = Path(folder) / "mnist.npz"
        for round_ in range(args.rounds):
            results["distsave"].append(_run([sys.executable, __file__, "--calls", str(args.calls),
                                             "--child", str(ours), repr(time.time())]))
            results[passive].append(_run([sys.executable, __file__, "--calls", str(args.calls),
                                          "--child", str(ours), repr(time.time())],
                                         env={"OMP_WAIT_POLICY": "PASSIVE"}))
            if theirs:
                results["TensorFlow 2.21"].append(_run([args.tf_python, str(HERE / "tf_peer.py"), "serve",
                                                        str(theirs), str(data), "--calls", str(args.calls),
                                                        "--started", repr(time.time())]))
            for side, runs in results.items():
                if runs:
                    print(f"round {round_ + 1} {side}: {json.dumps(runs[-1])}", flush=True)
    keys = [("cold start to first prediction (s)", "cold_start_s", "{:.2f}"),
            ("serving_default, batch 64, median (ms)", "serving_median_ms", "{:.2f}"),
            ("distributed inference, 10k test images (s)", "distributed_10k_s", "{:.2f}"),
            ("accuracy of that pass", "accuracy", "{:.4f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}")]
    print(f"\n## CPU inference, medians of {args.rounds} interleaved fresh-process rounds\n")
    print("| measure | distsave | distsave, OMP passive | TensorFlow 2.21 | distsave / TF | passive / TF |")
    print("|---|---:|---:|---:|---:|---:|")
    tf_runs = results["TensorFlow 2.21"]
    for label, key, fmt in keys:
        ours_value = statistics.median(r[key] for r in results["distsave"])
        passive_value = statistics.median(r[key] for r in results[passive])
        theirs_value = statistics.median(r[key] for r in tf_runs) if tf_runs else None
        ratios = [f"{v / theirs_value:.2f}x" if theirs_value else "n/a" for v in (ours_value, passive_value)]
        print(f"| {label} | {fmt.format(ours_value)} | {fmt.format(passive_value)} | "
              f"{fmt.format(theirs_value) if theirs_value is not None else 'n/a'} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
