"""Data-parallel scaling of ``fit``: samples/s with 1, 2, ... replicas at a fixed number of
examples per replica, and per-replica efficiency (rate / (replicas x one-replica rate)).

    python benchmarks/scaling.py --gpus 1 2 4 8          # MirroredStrategy over that many GPUs
    python benchmarks/scaling.py --cpu-replicas 1 2      # gloo over CPU processes
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(replicas: int, per_replica: int, gpus: bool, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report"
        command = [sys.executable, str(ROOT / "examples/train_mnist.py"), "--epochs", str(epochs),
                   "--per-replica-batch", str(per_replica), "--seed", "0", "--report", str(report)]
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(replicas))
        else:
            command += ["--cpu-replicas", str(replicas)]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(Path(f"{report}.0.json").read_text())["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--gpus", type=int, nargs="+")
    group.add_argument("--cpu-replicas", type=int, nargs="+")
    parser.add_argument("--per-replica", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    counts = args.gpus or args.cpu_replicas
    kind = "GPUs" if args.gpus else "CPU processes"
    for per_replica in args.per_replica:
        print(f"\n## {per_replica} examples per replica per step, last of {args.epochs} epochs\n")
        print(f"| {kind} | samples/s | per-replica efficiency |")
        print("|---:|---:|---:|")
        base = None
        for n in counts:
            rate = run(n, per_replica, bool(args.gpus), args.epochs)
            base = base or rate / n
            print(f"| {n} | {rate:,.0f} | {rate / (n * base):.2f} |", flush=True)


if __name__ == "__main__":
    main()
