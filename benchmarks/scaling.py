"""Data-parallel scaling of ``fit``: samples/s with 1, 2, ... replicas at a fixed number of
examples per replica, next to a plain-DDP peer (the same CNN, Adam and per-replica batch, data
on the device, an eager DDP step, started by torchrun) measured in the same run.

Runs are interleaved ``--repeats`` times; each is a line of ``benchmarks/results/scaling-*.jsonl``
(commit, card, versions, date); the table shows medians and per-replica efficiency
(rate / (replicas x the same way's one-replica rate)). On GPUs it also shows fit's rate against
N x the whole-step CUDA-graph limit of one GPU (`fit_speed.captured_graph`, measured first, in
this process, at the per-replica batch).

    python benchmarks/scaling.py --gpus 1 2 4 8          # MirroredStrategy over that many GPUs
    python benchmarks/scaling.py --cpu-replicas 1 2      # gloo over CPU processes
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raw_log import RawLog  # benchmarks/ is the script's folder, hence on sys.path

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("distsave fit", "plain DDP")


def _environment(replicas: int, gpus: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(replicas))
    return env


def run_distsave(replicas: int, per_replica: int, gpus: bool, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report"
        command = [sys.executable, str(ROOT / "examples/train_mnist.py"), "--epochs", str(epochs),
                   "--per-replica-batch", str(per_replica), "--seed", "0", "--report", str(report)]
        if not gpus:
            command += ["--cpu-replicas", str(replicas)]
        subprocess.run(command, check=True, env=_environment(replicas, gpus), stdout=subprocess.DEVNULL)
        return json.loads(Path(f"{report}.0.json").read_text())["samples_per_second"]


def run_ddp_peer(replicas: int, per_replica: int, gpus: bool, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "ddp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(replicas), str(Path(__file__).resolve()), "--ddp-worker", "--report", str(report),
                   "--per-replica", str(per_replica), "--epochs", str(epochs)]
        if gpus:
            command.append("--worker-on-gpu")
        subprocess.run(command, check=True, env=_environment(replicas, gpus), stdout=subprocess.DEVNULL)
        return json.loads(report.read_text())["samples_per_second"]


def ddp_worker(args: argparse.Namespace) -> None:
    """One process of the plain-DDP peer: samples/s of its last epoch, written by rank 0."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import distsave
    from distsave.demo import workflow_cnn

    dist.init_process_group("nccl" if args.worker_on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.worker_on_gpu:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as distsave's CPU replicas
    images, labels = next(iter(distsave.datasets.load("mnist", split="train").batch(60000)))
    images, labels = (images.float() / 255).to(device), labels.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(*workflow_cnn()).to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if args.worker_on_gpu else None)
    optimizer = torch.optim.Adam(model.parameters())
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch)).to(device)
        if args.worker_on_gpu:
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for rows in order.split(args.per_replica * world):
            mine = rows.tensor_split(world)[rank]
            loss = nn.functional.cross_entropy(model(images[mine]), labels[mine])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if args.worker_on_gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    if rank == 0:
        Path(args.report).write_text(json.dumps({"samples_per_second": len(images) / seconds}))
    dist.destroy_process_group()


def graph_limits(batches: list[int], repeats: int) -> dict[int, float]:
    """samples/s of one GPU replaying the whole captured step (median of ``repeats``), per batch."""
    from fit_speed import captured_graph, mnist_tensors

    images, labels, _ = mnist_tensors()
    device = torch.device("cuda", 0)
    return {b: sorted(captured_graph(images, labels, b, device)[0] for _ in range(repeats))[repeats // 2]
            for b in batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--gpus", type=int, nargs="+")
    group.add_argument("--cpu-replicas", type=int, nargs="+")
    group.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--per-replica", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are shown)")
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--worker-on-gpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        args.per_replica = args.per_replica[0]
        ddp_worker(args)
        return
    counts, gpus = args.gpus or args.cpu_replicas, bool(args.gpus)
    log = RawLog("scaling", torch.device("cuda" if gpus else "cpu"))
    print(f"# scaling: {log.context['card']}, torch {torch.__version__}, commit {log.context['commit'][:10]}, "
          f"{log.context['date']}; raw log {log.path}")
    runners = {"distsave fit": run_distsave, "plain DDP": run_ddp_peer}
    limits = graph_limits(args.per_replica, args.repeats) if gpus else {}
    for repeat in range(args.repeats):
        for per_replica in args.per_replica:
            for n in counts:
                for way, runner in runners.items():
                    rate = runner(n, per_replica, gpus, args.epochs)
                    log.write(way=way, replicas=n, per_replica=per_replica, repeat=repeat,
                              gpus=gpus, epochs=args.epochs, samples_per_second=rate)
    medians = log.medians(("way", "per_replica", "replicas"), "samples_per_second")
    kind = "GPUs" if gpus else "CPU processes"
    for per_replica in args.per_replica:
        print(f"\n## {per_replica} examples per replica per step, last of {args.epochs} epochs, "
              f"medians of {args.repeats} interleaved runs\n")
        limit = limits.get(per_replica)
        print(f"| {kind} | " + " | ".join(f"{w} samples/s | {w} efficiency" for w in WAYS)
              + (" | fit vs N x graph limit |" if limit else " |"))
        print("|---:|" + "---:|---:|" * len(WAYS) + ("---:|" if limit else ""))
        cells = {}
        for n in counts:
            for way in WAYS:
                rate = medians[(way, per_replica, n)][0]
                base = medians[(way, per_replica, counts[0])][0] / counts[0]
                cells[(n, way)] = f"{rate:,.0f} | {rate / (n * base):.2f}"
            versus = f" {medians[('distsave fit', per_replica, n)][0] / (n * limit):.2f} |" if limit else ""
            print(f"| {n} | " + " | ".join(cells[(n, w)] for w in WAYS) + " |" + versus, flush=True)
        if limit:
            print(f"\nwhole-step CUDA-graph limit, one GPU, {per_replica} per step: {limit:,.0f} samples/s")


if __name__ == "__main__":
    main()
