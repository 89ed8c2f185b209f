"""Checkpoint save/load speed: distsave against its peers and the raw disk, on the same bytes.

Each way saves the same model state (a `distsave.Sequential` of 8 square `nn.Linear` layers,
compiled with Adam and stepped once: weights + two moments, 6.44 GB by default) and loads it
back onto the device, every step in its own process (benchmarks/checkpoint_io_ways.py). Every
save is fsync'd; the checkpoint's files are evicted from the page cache before every load
(``--cold all``: the whole page cache, Python's own files included); each load is checked
against the saved tensors. Prints a markdown table with ratios against the disk ceiling and the fastest
peer, and writes a JSON-lines log (plus the table) under benchmarks/results/.

    PYTHONPATH=src python3 benchmarks/checkpoint_io.py --device cuda                # 6.44 GB
    PYTHONPATH=src python3 benchmarks/checkpoint_io.py --sharded 2 4   # ShardedStrategy: benchmarks/checkpoint_io_sharded.py
    .venv/bin/python benchmarks/checkpoint_io.py --device cpu --size-gb 0.5 --repeats 3
    .venv/bin/python benchmarks/checkpoint_io.py --device cpu --size-gb 0.05 --only safetensors,distsave

Ways: ceiling (4 writer threads from pinned memory + fsync / 4 reader threads), torch
(torch.save / torch.load(mmap=True)), safetensors (save_file / load_file(device=)), dcp
(torch.distributed.checkpoint, one process), fastsafetensors and runai (load only, from the
safetensors file; n/a where not installed), distsave (model.save / load_model under
OneDeviceStrategy; its program cache starts empty, so the first repeat exports the serving
program and later ones read it), distsave-first (model.save with the program cache off: every
save exports, as the first save of an architecture on a machine does), distsave-async
(model.save(blocking=False) + wait_for_saves(); n/a until the API exists).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import block_requests

HERE = Path(__file__).resolve().parent
STEP_SCRIPT = HERE / "checkpoint_io_ways.py"
WAYS = ("ceiling", "torch", "safetensors", "fastsafetensors", "runai", "dcp", "distsave", "distsave-first",
        "distsave-async")
OPS = {"ceiling": ("save", "load"), "torch": ("save", "load"), "safetensors": ("save", "load"),
       "fastsafetensors": ("load",), "runai": ("load",), "dcp": ("save", "load"),
       "distsave": ("save", "load"), "distsave-first": ("save",), "distsave-async": ("save",)}
READS_FROM = {"fastsafetensors": "safetensors", "runai": "safetensors"}
PEERS = ("torch", "safetensors", "fastsafetensors", "runai", "dcp")
LABELS = {"ceiling": "disk ceiling (4 threads + fsync / 4 readers)",
          "torch": "torch.save / torch.load(mmap=True)", "safetensors": "safetensors save_file / load_file",
          "dcp": "DCP, one process", "fastsafetensors": "fastsafetensors (load only)",
          "runai": "Run:ai model streamer (load only)", "distsave": "**distsave save / load_model**",
          "distsave-first": "**distsave save, program cache off**",
          "distsave-async": "**distsave save(blocking=False)**"}
STEP_TIMEOUT_S = 3600


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size-gb", type=float, default=6.44,
                        help="checkpoint size in GB (1e9 bytes): weights + two Adam moments (default 6.44)")
    parser.add_argument("--dir", type=Path, help="where to write: a new folder is made (and removed) in it "
                        "(default: the temporary folder, unless that is in RAM)")
    parser.add_argument("--only", type=lambda s: [w.strip() for w in s.split(",") if w.strip()],
                        default=list(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every step; the median is reported")
    parser.add_argument("--cold", choices=("files", "all"), default="files",
                        help="before each load, evict the checkpoint's files (default) or drop the whole page "
                             "cache, Python's own files included (root)")
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="folder for the JSON-lines log and the table (default benchmarks/results)")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(WAYS))
    if unknown:
        parser.error(f"--only expected names from {','.join(WAYS)}. Received unknown: {','.join(unknown)}.")
    if args.repeats < 1 or args.size_gb <= 0:
        parser.error("--repeats must be >= 1 and --size-gb > 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU here. Use --device cpu.")
    return args


# -- the machine and the disk -------------------------------------------------------------------
def mount_of(path: Path) -> dict[str, str]:
    """The mount holding ``path``: its source device, file system type and mount point."""
    best = {"mount": "/", "source": "?", "fstype": "?"}
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        source, mount, fstype = line.split()[:3]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best["mount"]):
            best = {"mount": mount, "source": source, "fstype": fstype}
    return best


def work_folder(requested: Path | None) -> Path:
    """A new folder to write in (removed at the end): inside ``requested``, else in the
    temporary folder, or in the current one where the temporary folder is in RAM (tmpfs)."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".checkpoint_io-", dir=requested))
    for parent in (Path(tempfile.gettempdir()), Path.cwd()):
        if mount_of(parent)["fstype"] not in ("tmpfs", "ramfs"):
            return Path(tempfile.mkdtemp(prefix=".checkpoint_io-", dir=parent))
    raise SystemExit("Both the temporary folder and the current folder are in RAM (tmpfs), which "
                     "would measure memory, not the disk. Pass --dir on a real disk.")


def cache_drop_method(cold: str) -> str:
    """How each load starts cold. ``files``: the checkpoint's files are evicted (per-file
    fadvise(DONTNEED)), the rest of the page cache stays, as on a machine that has run Python
    before. ``all``: the whole page cache is dropped (root), so whatever a way imports inside
    its timed load (torch imports torch._dynamo the first time a process builds an optimizer)
    is read from disk too."""
    if cold == "files":
        return "fadvise"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError as error:
        raise SystemExit(f"--cold all needs root to write /proc/sys/vm/drop_caches ({error}); use --cold files.")


def expose_cudart(folder: Path) -> str:
    """Make ``dlopen("libcudart.so")`` (fastsafetensors' call) work in the steps: where only a
    versioned libcudart exists (CUDA from pip wheels), link it into ``folder`` and put that on
    LD_LIBRARY_PATH. Returns what was done, for the log."""
    try:
        ctypes.CDLL("libcudart.so")
        return "libcudart.so found"
    except OSError:
        pass
    roots = [Path(p) for p in sys.path if p and Path(p, "nvidia").is_dir()]
    found = sorted(r for root in roots for r in Path(root, "nvidia").rglob("libcudart.so.*"))
    found += sorted(Path("/usr/local").glob("cuda*/lib*/libcudart.so.*"))
    if not found:
        return "no libcudart.so: fastsafetensors will fail on cuda"
    link = folder / "cudart" / "libcudart.so"
    link.parent.mkdir()
    link.symlink_to(found[0])
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(link.parent), os.environ.get("LD_LIBRARY_PATH")]))
    return f"linked {found[0]}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=HERE).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_COMMIT", "unknown (no git; set BENCH_COMMIT)")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def run_header(args: argparse.Namespace, folder: Path, cache: str, cudart: str) -> dict[str, Any]:
    return {"record": "run", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit(), "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_name(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "size_gb": args.size_gb, "repeats": args.repeats,
            "only": args.only, "dir": str(folder), "disk": mount_of(folder), "cache_drop": cache,
            "cudart": cudart}


# -- running the steps --------------------------------------------------------------------------
def program_cache_env(way: str, folder: Path) -> dict[str, str]:
    """distsave's program cache lives in the run's folder (emptied when the run starts, so a
    run's first save exports); distsave-first turns it off: every save exports, as a process's
    first save of an architecture never saved on the machine does."""
    if way == "distsave-first":
        return {**os.environ, "DISTSAVE_PROGRAM_CACHE": "0"}
    return {**os.environ, "DISTSAVE_CACHE_DIR": str(folder / "program-cache")}


def run_step(way: str, op: str, args: argparse.Namespace, folder: Path, cache: str) -> dict[str, Any]:
    """One save or load in a fresh process; its measurements, or why it did not run."""
    source = folder / READS_FROM.get(way, way)
    if op == "save":
        shutil.rmtree(source, ignore_errors=True)
    result_path = folder / f"{way}.{op}.result.json"
    result_path.unlink(missing_ok=True)
    task = {"way": way, "op": op, "device": "cuda:0" if args.device == "cuda" else "cpu",
            "size_gb": args.size_gb, "folder": str(source), "layout": f"{source}.layout.json",
            "cache": cache, "result": str(result_path)}
    stat = block_requests.stat_file(mount_of(folder)["source"])
    sampler = block_requests.RequestSampler(stat).start() if stat else None
    try:
        done = subprocess.run([sys.executable, str(STEP_SCRIPT), json.dumps(task)], capture_output=True,
                              text=True, timeout=STEP_TIMEOUT_S, env=program_cache_env(way, folder))
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {STEP_TIMEOUT_S} s"}
    finally:
        requests = sampler.stop() if sampler else None
    if done.returncode != 0 or not result_path.exists():
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": f"exit {done.returncode}: {last[:300]}", "stderr": done.stderr[-4000:]}
    return {**json.loads(result_path.read_text()), "disk_requests": requests}


def run_all(args: argparse.Namespace, folder: Path, cache: str, log, records: list[dict[str, Any]]) -> None:
    """Every selected way, repeat after repeat (so a busy moment of the machine hits all ways),
    in reverse order every other repeat (so no way always follows the same one); appends each
    step's record to ``records`` and ``log`` as it ends."""
    selected = [w for w in WAYS if w in args.only]
    # Compile the modules a distsave save imports on first use once, untimed: where torch ships
    # without bytecode (the GPU image, with PYTHONPYCACHEPREFIX), the first process to import
    # them would otherwise spend seconds compiling them inside its timed save.
    subprocess.run([sys.executable, "-c", "import distsave, torch.export, torch._export.serde.serialize"],
                   check=False, capture_output=True)
    shutil.rmtree(folder / "program-cache", ignore_errors=True)
    for repeat in range(args.repeats):
        order = selected if repeat % 2 == 0 else selected[::-1]
        for position, way in enumerate(order):
            source = READS_FROM.get(way)
            if source and not (folder / source / "state.safetensors").exists():
                prepared = run_step(source, "save", args, folder, cache)  # untimed: the file to read
                if prepared["status"] != "ok":
                    print(f"# {way}: could not write the {source} file it reads: {prepared.get('reason')}")
            for op in OPS[way]:
                record = {"record": "step", "way": way, "op": op, "repeat": repeat,
                          **run_step(way, op, args, folder, cache)}
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(f"# {repeat} {way:15} {op:4} {describe(record)}", flush=True)
            later = order[position + 1:]
            for name in {way, source} - {None, *(READS_FROM.get(w) for w in later)}:
                shutil.rmtree(folder / name, ignore_errors=True)  # at most two checkpoints on disk


# -- reporting ----------------------------------------------------------------------------------
def describe(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('reason', '')}"
    text = f"{record['seconds']:.3f} s, {record['checkpoint_bytes'] / 1e9 / record['seconds']:.2f} GB/s"
    if "blocked_s" in record:
        text += f", blocked {record['blocked_s']:.3f} s (first save {record['first_blocked_s']:.3f} s)"
    if "verified" in record:
        text += ", verified" if record["verified"] else f", WRONG TENSORS {record['mismatched']}"
    text += f", peak RSS +{(record['rss_peak'] - record['rss_before']) / 2**30:.2f} GiB"
    if record.get("disk_requests"):
        text += f"; disk: {block_requests.describe(record['disk_requests'], record['op'])}"
    return text


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (way, op): the median seconds, GB/s and peak-RSS rise over ok repeats, or why none ran."""
    summary = {}
    for key in {(r["way"], r["op"]) for r in records}:
        runs = [r for r in records if (r["way"], r["op"]) == key]
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            summary[key] = {"status": runs[0]["status"], "reason": runs[0].get("reason", "")}
            continue
        seconds = statistics.median(r["seconds"] for r in ok)
        summary[key] = {
            "status": "ok", "seconds": seconds, "gb_per_s": ok[0]["checkpoint_bytes"] / 1e9 / seconds,
            "rss_rise_gib": statistics.median((r["rss_peak"] - r["rss_before"]) / 2**30 for r in ok),
            "verified": all(r.get("verified", True) for r in ok),
            "blocked_s": statistics.median(r["blocked_s"] for r in ok) if "blocked_s" in ok[0] else None,
            "first_blocked_s": statistics.median(r["first_blocked_s"] for r in ok) if "blocked_s" in ok[0] else None}
    return summary


def same_bytes(records: list[dict[str, Any]]) -> str:
    """Whether every save wrote the same tensors (their fingerprints agree)."""
    totals = {r["fingerprint_total"] for r in records if r["op"] == "save" and r["status"] == "ok"}
    return "every save wrote the same tensors" if len(totals) <= 1 else "**SAVES WROTE DIFFERENT TENSORS**"


def best_peer(summary: dict, op: str) -> float | None:
    speeds = [s["gb_per_s"] for (way, o), s in summary.items() if o == op and way in PEERS and s["status"] == "ok"]
    return max(speeds, default=None)


def table(header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    summary = summarize(records)
    ceiling = {op: summary.get(("ceiling", op), {}).get("gb_per_s") for op in ("save", "load")}
    peer = {op: best_peer(summary, op) for op in ("save", "load")}

    def cells(way: str, op: str) -> list[str]:
        s = summary.get((way, op))
        if s is None:
            return ["—"] * 4
        if s["status"] != "ok":
            return [s["status"], "", "", ""]
        def ratio(base: float | None) -> str:
            return f"{s['gb_per_s'] / base:.2f}×" if base else "—"
        return [f"{s['seconds']:.2f}", f"{s['gb_per_s']:.2f}", ratio(ceiling[op]), ratio(peer[op])]

    short_commit = header["commit"][:12] + ("-dirty" if header["commit"].endswith("-dirty") else "")
    lines = [
        f"checkpoint {header['size_gb']} GB (weights + Adam) on {header['device']} "
        f"({header['device_name']}), torch {header['torch']}, Python {header['python']}, "
        f"{header['date']}, commit {short_commit}; disk {header['disk']['source']} "
        f"({header['disk']['fstype']}); caches dropped by {header['cache_drop']}; "
        f"median of {header['repeats']}; {same_bytes(records)}",
        "",
        "| way | save s | save GB/s | × write ceiling | × best peer | load s | load GB/s | × read ceiling "
        "| × best peer | peak RSS rise GiB save / load | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for way in [w for w in WAYS if any(k[0] == w for k in summary)]:
        load = summary.get((way, "load"), {})
        notes = [f"{s['status']}: {s['reason']}" for (w, _), s in summary.items() if w == way and s["status"] != "ok"]
        if load.get("status") == "ok":
            notes.append("loads verified" if load["verified"] else "**LOADED WRONG TENSORS**")
        for op in ("save", "load"):
            shapes = [r["disk_requests"] for r in records
                      if (r["way"], r["op"]) == (way, op) and r["status"] == "ok" and r.get("disk_requests")]
            if shapes:
                notes.append("disk " + block_requests.typical(shapes, op))
        hits = [r.get("program_cache") for r in records if (r["way"], r["op"]) == (way, "save") and r["status"] == "ok"]
        if way.startswith("distsave") and hits:
            notes.append(f"program from the cache in {hits.count('hit')} of {len(hits)} saves")
        blocked = summary.get((way, "save"), {}).get("blocked_s")
        if blocked is not None:
            first = summary[way, "save"]["first_blocked_s"]
            notes.append(f"save blocked the caller {blocked:.3f} s ({first:.3f} s on the first save, "
                         "the process's first: copies made anew, the program exported or handed to a helper); "
                         "save s is until durable")
        rise = " / ".join(f"{summary[way, op]['rss_rise_gib']:.2f}" if summary.get((way, op), {}).get("status") == "ok"
                          else "—" for op in ("save", "load"))
        lines.append(f"| {LABELS[way]} | " + " | ".join(cells(way, "save") + cells(way, "load"))
                     + f" | {rise} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    if "--sharded" in sys.argv:  # every rank its own shards: a benchmark of its own
        import checkpoint_io_sharded

        rest = sys.argv[1:]
        at = rest.index("--sharded")
        ranks = [a for a in rest[at + 1:] if a.isdigit()]
        checkpoint_io_sharded.main(rest[:at] + ["--ranks", *ranks] + rest[at + 1 + len(ranks):])
        return
    args = parse_args()
    folder = work_folder(args.dir)
    cache = cache_drop_method(args.cold)
    cudart = expose_cudart(folder) if args.device == "cuda" else "n/a"
    header = run_header(args, folder, cache, cudart)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"checkpoint_io-{header['date'][:19].replace(':', '')}-{args.device}"
    print(f"# writing in {folder} ({header['disk']['fstype']} on {header['disk']['source']}); "
          f"page cache dropped by {cache}; log {stem}.jsonl", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("# stopped (SIGTERM): the table holds the steps done"))
    records: list[dict[str, Any]] = []
    try:
        with open(f"{stem}.jsonl", "w") as log:
            log.write(json.dumps(header) + "\n")
            run_all(args, folder, cache, log, records)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if records:
            report = table(header, records)
            Path(f"{stem}.md").write_text(report + "\n")
            print(report, flush=True)


if __name__ == "__main__":
    main()
