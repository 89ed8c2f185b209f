"""Latency and throughput of `distsave serve` for the workflow's MNIST CNN, with and without
dynamic batching, against the floor of calling the signature in-process.

Each request is one 28x28 image in TF Serving's row format. Clients are asyncio tasks in this
process (one HTTP connection each), so on a small machine they share the CPU with the server:
numbers are end-to-end on that machine, JSON included.

    python benchmarks/serve_latency.py                       # concurrency 1, 8, 64
    python benchmarks/serve_latency.py --requests 400 --max-batch-size 64 --batch-timeout-ms 2
    python benchmarks/serve_latency.py --device cuda:0       # the server's signatures on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import distsave
from distsave.demo import workflow_cnn


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def in_process_floor(path: Path, repeats: int) -> dict[str, float]:
    """Signature call time at batch 1 (latency floor) and rows/s at batch 64 (throughput floor)."""
    signature = distsave.saved_model.load(path).signatures["serving_default"]
    one, many = torch.rand(1, 1, 28, 28), torch.rand(64, 1, 28, 28)
    times = []
    with torch.no_grad():
        for _ in range(10):
            signature(one)
        for _ in range(repeats):
            start = time.perf_counter()
            signature(one)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(20):
            signature(many)
        rows_per_s = 20 * 64 / (time.perf_counter() - start)
    return {"p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3,
            "rows_per_s": rows_per_s}


async def load(url: str, concurrency: int, requests: int, body: dict) -> dict[str, float]:
    latencies: list[float] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        async with httpx.AsyncClient(timeout=120) as http:
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                answer = await http.post(url, json=body)
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    raise RuntimeError(f"request failed: {answer.status_code} {answer.text[:200]}")

    async with httpx.AsyncClient() as warm:
        for _ in range(5):
            await warm.post(url, json=body)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "req_per_s": len(latencies) / elapsed, "mean_ms": statistics.fmean(latencies) * 1e3}


def start_server(path: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "distsave.cli", "serve", str(path), "--name", "mnist",
                                "--port", "0", *args], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process, line.split(" at ", 1)[1].split()[0] + ":predict"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--device", default="cpu", help="where the server runs signatures (cuda:0 on a GPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn(), input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    body = {"instances": torch.rand(1, 1, 28, 28).tolist()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mnist"
        model.save(str(path))
        floor = in_process_floor(path, args.requests)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.requests} requests "
              "per level, one image each\n")
        print("| server | concurrency | p50 ms | p99 ms | requests/s |")
        print("|---|---:|---:|---:|---:|")
        print(f"| in-process signature call (floor) | 1 | {floor['p50_ms']:.2f} | {floor['p99_ms']:.2f} | "
              f"{1e3 / floor['p50_ms']:,.0f} (batch 64: {floor['rows_per_s']:,.0f} rows/s) |")
        settings = {"no batching": ["--device", args.device],
                    f"batching (max {args.max_batch_size}, {args.batch_timeout_ms:g} ms)":
                        ["--device", args.device, "--max-batch-size", str(args.max_batch_size),
                         "--batch-timeout-ms", str(args.batch_timeout_ms)]}
        for label, flags in settings.items():
            process, url = start_server(path, flags)
            try:
                for concurrency in args.concurrency:
                    result = asyncio.run(load(url, concurrency, args.requests, body))
                    print(f"| distsave serve, {label} | {concurrency} | {result['p50_ms']:.2f} | "
                          f"{result['p99_ms']:.2f} | {result['req_per_s']:,.0f} |", flush=True)
            finally:
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
