"""Where a save's write time goes: distsave's tensor engine against the disk ceiling, same bytes.

Writes the checkpoint benchmark's state (8 square fp32 layers + two Adam moments, 6.44 GB by
default) straight through `ArtifactWriter.write_tensor_sets` (the tensor files of a save, with
checksums and fsync, without export or manifest), from device memory and from page-locked host
memory, at several shard sizes; and the disk ceiling of checkpoint_io.py (4 threads, 4 files,
fsync) from the same host memory. Medians of ``--repeats``; GB/s and the ratio to the ceiling.

    PYTHONPATH=src python3 benchmarks/write_paths.py --dir /tmp --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_io_ways import LAYERS, fsync_path, layer_width, write_parts  # noqa: E402

from distsave.saving.manifest import ArtifactWriter  # noqa: E402

GiB = 2**30


def state(size_gb: float, device: str) -> dict[str, dict[str, torch.Tensor]]:
    width = layer_width(size_gb)
    weights, moments = {}, {}
    for i in range(LAYERS):
        weights[f"{i}.weight"] = torch.rand(width, width, device=device)
        weights[f"{i}.bias"] = torch.rand(width, device=device)
        for key in ("exp_avg", "exp_avg_sq"):
            moments[f"{i}.weight/{key}"] = torch.rand(width, width, device=device)
            moments[f"{i}.bias/{key}"] = torch.rand(width, device=device)
    return {"model": weights, "optimizer": moments}


def pinned_copy(sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {stem: {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for name, t in tensors.items()}
            for stem, tensors in sets.items()}


def timed(work, folder: Path) -> float:
    os.sync()
    folder.mkdir()
    start = time.perf_counter()
    work(folder)
    fsync_path(folder)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=6.44)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shards-gib", type=float, nargs="+", default=[4, 1, 0.5])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = state(args.size_gb, device)
    host = pinned_copy(on_device) if device == "cuda" else on_device
    total = sum(t.numel() * t.element_size() for tensors in host.values() for t in tensors.values())
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=device == "cuda")
    offset = 0
    for tensors in host.values():
        for t in tensors.values():
            n = t.numel() * t.element_size()
            flat[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
            offset += n
    memory = memoryview(flat.numpy())
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="write-paths-"))
    ways = {"ceiling (4 threads, 4 files)": lambda folder: write_parts(folder, "part", memory)}
    for shard in args.shards_gib:
        limit = int(shard * GiB)
        ways[f"engine from host, shards <= {shard:g} GiB"] = (
            lambda folder, limit=limit: ArtifactWriter(folder).write_tensor_sets(host, limit))
        if device == "cuda":
            ways[f"engine from device, shards <= {shard:g} GiB"] = (
                lambda folder, limit=limit: ArtifactWriter(folder).write_tensor_sets(on_device, limit))
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.repeats):
            for name, work in ways.items():  # interleaved, so drift hits every way alike
                seconds[name].append(timed(work, root / "out"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ceiling = total / 1e9 / statistics.median(seconds["ceiling (4 threads, 4 files)"])
    print(f"{total / 1e9:.2f} GB on {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    print("| way | GB/s (median) | x ceiling | runs (s) |\n|---|---:|---:|---|")
    for name, runs in seconds.items():
        rate = total / 1e9 / statistics.median(runs)
        print(f"| {name} | {rate:.2f} | {rate / ceiling:.2f} | {', '.join(f'{s:.2f}' for s in runs)} |")
    print(json.dumps({"bytes": total, "seconds": seconds}))


if __name__ == "__main__":
    main()
