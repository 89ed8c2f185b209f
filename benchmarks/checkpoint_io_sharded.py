"""Sharded checkpoint speed: every rank saves and loads its own shards, distsave against DCP,
gathering the full state to rank 0 for one safetensors writer, and the disk ceiling; same run,
same bytes (a `distsave.Sequential` of square bias-free `nn.Linear` layers under
`ShardedStrategy`, stepped once with Adam: weights + two moments, 12.9 GB by default).

    PYTHONPATH=src python3 benchmarks/checkpoint_io.py --sharded 2 4
    .venv/bin/python benchmarks/checkpoint_io_sharded.py --ranks 2 --device cpu --size-gb 0.05

For each rank count the driver starts ``torchrun --nproc-per-node N`` twice: once to save with
every way (the model is built and stepped once), once to load with every way, the page cache
dropped before each load. Each timing runs from a barrier to a barrier (the slowest rank).
Loads are checked against per-rank checksums the save wrote. Prints a markdown table and
writes it with a JSON-lines log under benchmarks/results/.

Ways: ceiling (each rank writes its shard bytes from pinned memory to its own files with 4
threads + fsync, as checkpoint_io.py's ceiling; reads them back with 4 threads), dcp (torch.distributed.checkpoint save/load
of the sharded model and optimizer state), gather (full state gathered to rank 0's CPU, one
safetensors save_file: save only), distsave (model.save / load_model under ShardedStrategy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from checkpoint_io_ways import fsync_path, read_parts, write_parts

HERE = Path(__file__).resolve().parent
WAYS = ("ceiling", "dcp", "gather", "distsave")
LOADS = ("ceiling", "dcp", "distsave")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size-gb", type=float, default=4 * 2**30 / 1e9, help="fp32 weights (Adam adds 2x)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    parser.add_argument("--worker", choices=("save", "load"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- worker (one per rank, under torchrun) ------------------------------------------------------
def build(args: argparse.Namespace):
    import distsave
    from torch import nn

    strategy = distsave.ShardedStrategy()
    width = int(math.sqrt(args.size_gb * 1e9 / 4 / args.layers))
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Sequential([nn.Linear(width, width, bias=False) for _ in range(args.layers)],
                                    input_spec=distsave.TensorSpec((None, width)))
        model.compile(loss="mse", optimizer="adam")
    rows = 2 * strategy.num_replicas_in_sync
    model.fit(torch.randn(rows, width), torch.randn(rows, width), batch_size=rows, epochs=1, verbose=0)
    return strategy, model


def local_state(model) -> dict[str, torch.Tensor]:
    """This rank's shards of every weight and optimizer tensor (plain local tensors)."""
    from torch.distributed.tensor import DTensor

    local = {f"w/{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in model.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim():
                local[f"o/{names[id(param)]}/{key}"] = value
    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach() for k, v in local.items()}


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in tensors.items()}


def global_bytes(model) -> int:
    state = list(model.state_dict().values())
    state += [v for s in model.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    return sum(v.numel() * v.element_size() for v in state)


def dcp_state(model) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, model.optimizer)}


def save_ways(model, folder: Path, rank: int) -> dict[str, Callable[[], None]]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    def ceiling() -> None:
        tensors = local_state(model)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        buffer = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        offset = 0
        for t in tensors.values():
            n = t.numel() * t.element_size()
            buffer[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
            offset += n
        (folder / "ceiling").mkdir(exist_ok=True)
        write_parts(folder / "ceiling", f"rank{rank}", memoryview(buffer.numpy()))

    def gather() -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, model.optimizer, options=options)
        if rank == 0:
            full = {f"w/{k}": v for k, v in weights.items()}
            full.update({f"o/{p}/{k}": v for p, s in optim["state"].items() for k, v in s.items()
                         if isinstance(v, torch.Tensor) and v.dim()})
            (folder / "gather").mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in full.items()}, folder / "gather" / "state.safetensors")
            fsync_path(folder / "gather" / "state.safetensors")

    return {"ceiling": ceiling,
            "dcp": lambda: dcp.save(dcp_state(model), checkpoint_id=str(folder / "dcp")),
            "gather": gather,
            "distsave": lambda: model.save(folder / "distsave")}


def drop_cache(folder: Path) -> str:
    """Evict ``folder``'s files from the page cache: drop_caches as root, else fadvise(DONTNEED)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def timed(strategy, work: Callable[[], Any]) -> float:
    strategy.barrier()
    start = time.perf_counter()
    work()
    strategy.barrier()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    strategy, model = build(args)
    rank, folder = strategy.replica_id, args.dir
    total = global_bytes(model)
    results: dict[str, Any] = {"ranks": strategy.num_replicas_in_sync, "bytes": total,
                               "peak_rss_gib": None, "op": args.worker}
    if args.worker == "save":
        (folder / f"checksums.{rank}.json").write_text(json.dumps(checksums(local_state(model))))
        (folder / f"ceiling.{rank}.bytes").write_text(str(sum(t.numel() * t.element_size() for t in local_state(model).values())))
        for way, work in save_ways(model, folder, rank).items():
            results[way] = timed(strategy, work)
    else:
        import distsave
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        expected = json.loads((folder / f"checksums.{rank}.json").read_text())
        ceiling_bytes = int((folder / f"ceiling.{rank}.bytes").read_text())
        checks = {}
        for way in LOADS:
            if rank == 0:
                results["cache_drop"] = drop_cache(folder)
            strategy.barrier()
            if way == "ceiling":
                buffer = torch.empty(ceiling_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                results[way] = timed(strategy, lambda: read_parts(folder / "ceiling", f"rank{rank}",
                                                                  memoryview(buffer.numpy())))
            elif way == "dcp":
                for t in local_state(model).values():
                    t.zero_()

                def load_dcp() -> None:
                    state = dcp_state(model)
                    dcp.load(state, checkpoint_id=str(folder / "dcp"))
                    set_model_state_dict(model, state["model"])
                    set_optimizer_state_dict(model, model.optimizer, state["optim"])
                results[way] = timed(strategy, load_dcp)
                checks[way] = checksums(local_state(model)) == expected
            else:
                loaded = {}

                def load_distsave() -> None:
                    with strategy.scope():
                        loaded["model"] = distsave.load_model(folder / "distsave")
                results[way] = timed(strategy, load_distsave)
                checks[way] = checksums(local_state(loaded.pop("model"))) == expected
        results["checks"] = checks
    import resource

    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=strategy.device)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    results["peak_rss_gib"] = round(float(rss), 2)
    checks_ok = torch.tensor([int(all(results.get("checks", {}).values()))], device=strategy.device)
    dist.all_reduce(checks_ok, op=dist.ReduceOp.MIN)
    results["all_ranks_checked"] = bool(checks_ok.item())
    if rank == 0:
        (folder / f"{args.worker}.result.json").write_text(json.dumps(results))


# -- driver -------------------------------------------------------------------------------------
def run(args: argparse.Namespace, ranks: int, folder: Path, op: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone",
               str(Path(__file__)), "--worker", op, "--device", args.device, "--size-gb", str(args.size_gb),
               "--layers", str(args.layers), "--dir", str(folder)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = folder / f"{op}.result.json"
    if done.returncode != 0 or not result.exists():
        return {"error": (done.stderr or done.stdout)[-3000:]}
    return json.loads(result.read_text())


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| ranks | way | save GB/s | × ceiling | load GB/s | × ceiling | load checked |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for entry in runs:
        save, load = entry["save"], entry["load"]
        if "error" in save or "error" in load:
            lines.append(f"| {entry['ranks']} | failed | {(save.get('error') or load.get('error'))[-200:]!r} |")
            continue
        gb = save["bytes"] / 1e9
        for way in WAYS:
            s = gb / save[way] if way in save else None
            l = gb / load[way] if way in load else None
            sc = gb / save["ceiling"]
            lc = gb / load["ceiling"]
            lines.append(f"| {entry['ranks']} | {way} | {s:.2f} | {s / sc:.2f} | "
                         + (f"{l:.2f} | {l / lc:.2f} | {load['checks'].get(way, '—')} |" if l else "n/a | | |"))
        lines.append(f"| {entry['ranks']} | peak RSS per rank: save {save['peak_rss_gib']} GiB, load "
                     f"{load['peak_rss_gib']} GiB; {gb:.2f} GB; cache: {load.get('cache_drop')} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    base = args.dir or Path.cwd() / ".checkpoint_io_sharded"
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    runs = []
    for ranks in args.ranks:
        folder = base / f"ranks{ranks}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        entry = {"ranks": ranks, "device": device, "save": run(args, ranks, folder, "save")}
        entry["load"] = run(args, ranks, folder, "load") if "error" not in entry["save"] else {"error": "no save"}
        runs.append(entry)
        shutil.rmtree(folder, ignore_errors=True)
    text = f"# sharded checkpoint I/O, {device}, {stamp}\n\n" + table(runs)
    print(text)
    out = HERE / "results" / f"checkpoint_io_sharded-{stamp}-{args.device}"
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")


if __name__ == "__main__":
    main()
