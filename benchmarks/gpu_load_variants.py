"""GPU load probes: cold loads of one checkpoint by fastsafetensors and by `load_model` with
variants of its GPU reader, interleaved round after round (the order reversed every other
round), each load in its own process through checkpoint_io's own step. Prints every load with
the disk's requests, then medians and ratios against fastsafetensors; writes a JSON-lines log.

    PYTHONPATH=src python3 benchmarks/gpu_load_variants.py --rounds 5 \\
        --variants fst,committed,threads,depth=32 --results /tmp/probe

Variants: ``fst`` (fastsafetensors on the safetensors file), ``fst-distsave`` (fastsafetensors
on distsave's own files: the same disk blocks; not "verified", its tensor names are
distsave's), ``committed`` (`load_model` as it is), or settings of distsave's GPU reader joined
by ``+``: ``threads`` (no kernel queue: the threaded block reader), ``depth=N`` (kernel reads in
flight), ``block_kib=N``, ``placers=N`` (threads that hash and place chunks), ``held=N`` (chunks
with a buffer at once), ``io_threads=N`` (DISTSAVE_IO_THREADS), ``spin`` (the kernel queue
polls for ended reads instead of sleeping), ``pin_memory`` (staging buffers from
``pin_memory`` on 4 KiB pages, as before the thirteenth round, instead of huge pages registered
with CUDA: `distsave.saving.pinned`), ``uring`` (``io_uring`` with the buffers registered
instead of kernel AIO: `uring_reads`), ``clock`` (the seconds and calls spent in
``io_submit`` and ``io_getevents``, recorded as ``submit_s``/``submit_calls``/``reap_s``/...).
The settings ``submitters=N`` and
``ordered=N`` (several submitting threads), refuted in the twelfth and thirteenth rounds, are
in this file as of commit e5490ed.
Each distsave record also has the seconds spent inside ``read_files`` and ``load_model``.

Use ``--cold files`` (the default, as checkpoint_io.py): dropping the whole page cache makes
fastsafetensors read its own libraries inside its timed load (benchmarks/RESULTS.md, tenth round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANT_ENV = "DISTSAVE_PROBE_VARIANT"
PEERS = {"fst": "fastsafetensors", "fst-distsave": "fst-distsave"}


# -- in the step's process ----------------------------------------------------------------------
SETTINGS = ("committed", "threads", "depth", "block_kib", "placers", "held", "io_threads", "spin", "pin_memory",
            "uring", "clock")


def settings(variant: str) -> list[tuple[str, str]]:
    """``variant``'s settings as (name, value) pairs; a clear error for an unknown one."""
    pairs = [part.partition("=")[::2] for part in variant.split("+") if part]
    unknown = [name for name, _ in pairs if name not in SETTINGS]
    if unknown or not pairs:
        raise SystemExit(f"variant {variant!r}: expected {', '.join(PEERS)}, or settings from "
                         f"{', '.join(SETTINGS)} joined by '+' (depth=32+placers=8). Received {unknown or 'none'}.")
    return pairs


def apply_variant(variant: str, phases: dict[str, float]) -> None:
    """Set distsave's GPU reader as ``variant`` says, before the step imports anything else,
    the settings in the order of `SETTINGS` whatever their order in ``variant`` (``clock``
    times the reader ``uring`` chose); settings that measure something add it to ``phases``."""
    from distsave.saving import direct_reads, tensor_io

    for name, value in sorted(settings(variant), key=lambda pair: SETTINGS.index(pair[0])):
        if name == "threads":
            tensor_io.KernelReads = type("NoKernelReads", (), {"open": staticmethod(lambda depth: None)})
        elif name == "depth":
            tensor_io.QUEUE_DEPTH = int(value)
        elif name == "block_kib":
            direct_reads.BLOCK_BYTES = int(value) * 1024
        elif name == "placers":
            direct_reads.PLACING_THREADS = int(value)
        elif name == "held":
            direct_reads.HELD_CHUNKS = int(value)
        elif name == "io_threads":
            os.environ["DISTSAVE_IO_THREADS"] = value
        elif name == "spin":
            spin_on_reads()
        elif name == "pin_memory":
            from distsave.saving import pinned
            del pinned.mmap.MADV_HUGEPAGE  # this process only: `PinnedPool` falls back to pin_memory
        elif name == "uring":
            read_through_uring(phases)
        elif name == "clock":
            clock_kernel_calls(phases)


def spin_on_reads() -> None:
    """Make the kernel queue poll for ended reads (``io_getevents`` with no minimum, the
    interpreter lock let go at each call) instead of sleeping until one ends: what is left of
    the gap to fastsafetensors if the submitting thread's wake-up is what costs it."""
    from distsave.saving.kernel_aio import KernelReads

    sleeping_reap = KernelReads.reap

    def reap(self, at_least: int) -> list[tuple[int, int]]:
        while not (ended := sleeping_reap(self, 0)) and at_least:
            pass
        return ended

    KernelReads.reap = reap


def read_through_uring(phases: dict[str, float]) -> None:
    """Keep the reads in flight through ``io_uring`` (`uring_reads.UringReads`) instead of
    kernel AIO, each buffer registered with the ring the first time a chunk is read into it;
    how many were registered, or refused, goes to ``phases``."""
    import bisect

    import uring_reads

    from distsave.saving import direct_reads, tensor_io

    stage = direct_reads.BlockReads._stage

    def registered(self, chunk) -> None:
        stage(self, chunk)
        buffer = (chunk.staging[0].data_ptr(), chunk.staging[0].numel())
        if buffer not in uring_reads.BUFFERS:
            bisect.insort(uring_reads.BUFFERS, buffer)

    tensor_io.KernelReads = uring_reads.UringReads
    direct_reads.BlockReads._stage = registered
    uring_reads.COUNTS = phases


def clock_kernel_calls(phases: dict[str, float]) -> None:
    """Add the seconds and number of calls of the queue's ``submit`` and ``reap`` (kernel AIO,
    or ``io_uring`` after ``uring``) to ``phases``, summed over the submitting threads: how busy
    they are inside system calls."""
    import threading

    from distsave.saving import tensor_io

    lock = threading.Lock()
    for name in ("submit", "reap"):
        call = getattr(tensor_io.KernelReads, name)

        def counted(*args, _call=call, _name=name):
            start = time.perf_counter()
            try:
                return _call(*args)
            finally:
                with lock:
                    phases[f"{_name}_s"] = phases.get(f"{_name}_s", 0.0) + time.perf_counter() - start
                    phases[f"{_name}_calls"] = phases.get(f"{_name}_calls", 0) + 1

        setattr(tensor_io.KernelReads, name, counted)


def timed(phases: dict[str, float], name: str, function):
    """``function``, adding the seconds each call takes to ``phases[name]``."""
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return run


def load_fastsafetensors_on_distsave(folder: Path, device: str, layout: dict[str, Any]):
    """fastsafetensors reading every safetensors file of a distsave artifact."""
    from checkpoint_io_ways import fastsafetensors_reader

    return fastsafetensors_reader(sorted(folder.rglob("*.safetensors")), device, None)


def step(task_json: str) -> None:
    """checkpoint_io_ways' step, with the variant applied and the reader's phases recorded."""
    sys.path.insert(0, str(HERE))
    variant = os.environ.get(VARIANT_ENV, "committed")
    phases: dict[str, float] = {}
    if variant not in PEERS:
        apply_variant(variant, phases)
    import distsave
    from distsave.saving import snapshot

    import checkpoint_io_ways

    snapshot.read_files = timed(phases, "read_files_s", snapshot.read_files)
    distsave.load_model = timed(phases, "load_model_s", distsave.load_model)
    checkpoint_io_ways.LOADS["fst-distsave"] = load_fastsafetensors_on_distsave
    sys.argv = [sys.argv[0], task_json]
    checkpoint_io_ways.main()
    result_path = Path(json.loads(task_json)["result"])
    result_path.write_text(json.dumps({**json.loads(result_path.read_text()), **phases}))


# -- the driver -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-gb", type=float, default=6.44)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only checks the harness: the reader's variants act on GPU loads")
    parser.add_argument("--cold", choices=("files", "all"), default="files")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default as checkpoint_io.py)")
    parser.add_argument("--results", type=Path, required=True, help="folder for variants.jsonl")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for variant in set(args.variants) - set(PEERS):
        settings(variant)
    sys.path.insert(0, str(HERE))
    import checkpoint_io as cio

    cio.STEP_SCRIPT = Path(__file__).resolve()
    cio.READS_FROM["fst-distsave"] = "distsave"
    folder, cache = cio.work_folder(args.dir), cio.cache_drop_method(args.cold)
    cio.expose_cudart(folder)
    args.results.mkdir(parents=True, exist_ok=True)
    for way in ("distsave", "safetensors"):  # the files every variant reads
        os.environ[VARIANT_ENV] = "committed"
        saved = cio.run_step(way, "save", args, folder, cache)
        print(f"# {way} save: {saved.get('status')} {saved.get('seconds', 0):.2f} s {saved.get('reason') or ''}", flush=True)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    with open(args.results / "variants.jsonl", "w") as log:
        for number in range(args.rounds):
            order = args.variants if number % 2 == 0 else args.variants[::-1]
            for position, variant in enumerate(order):
                os.environ[VARIANT_ENV] = variant
                result = cio.run_step(PEERS.get(variant, "distsave"), "load", args, folder, cache)
                record = {"round": number, "variant": variant, "position": position, **result}
                record.pop("stderr", None)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if result.get("status") == "ok":
                    times[variant].append(result["seconds"])
                requests = result.get("disk_requests") or {}
                print(f"{number} {variant:24} {result.get('status')} {result.get('seconds', 0):.3f} s "
                      f"verified={result.get('verified')} read_files={result.get('read_files_s', 0):.3f} s "
                      f"requests={requests.get('reads')} in_flight={requests.get('mean_in_flight')} "
                      f"submit={result.get('submit_s', 0):.3f} s reap={result.get('reap_s', 0):.3f} s "
                      f"{result.get('reason') or ''}", flush=True)
    peer = statistics.median(times["fst"]) if times.get("fst") else None
    for variant, seconds in times.items():
        if seconds:
            median = statistics.median(seconds)
            ratio = f", fastsafetensors / this {peer / median:.3f}" if peer else ""
            print(f"MEDIAN {variant:24} {median:.3f} s over {len(seconds)}{ratio}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        step(sys.argv[1])
    else:
        main()
