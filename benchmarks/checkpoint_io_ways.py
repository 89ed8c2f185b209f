"""One measured step of the checkpoint I/O benchmark, run in a fresh process by checkpoint_io.py.

    python benchmarks/checkpoint_io_ways.py '{"way": "torch", "op": "save", "device": "cpu", ...}'

Every save builds the same state (a `distsave.Sequential` of big `nn.Linear` layers, compiled
with Adam and stepped once, so Adam's two moments exist) on the target device and writes it, up
to the last fsync. Every load reads it back onto the target device from a cold page cache. The
step writes one JSON file: seconds, bytes, peak host memory, and a fingerprint of the tensors
that the parent compares between the save and each load.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distsave

LAYERS = 8
WRITERS = 4  # threads of the disk ceiling, each with its own file
CHUNK = 64 << 20  # bytes per pwrite/preadv call of the disk ceiling

Tensors = dict[str, torch.Tensor]
Layout = dict[str, Any]  # {"names": [...], "shapes": [...], "dtypes": [...], "fingerprint": {...}}


class Unavailable(Exception):
    """This way cannot run here (a missing package or API); reported as n/a, not as a failure."""


# -- the state every way saves ------------------------------------------------------------------
def layer_width(size_gb: float) -> int:
    """Width of the square layers whose weights + two Adam moments make about ``size_gb`` GB."""
    per_layer_elements = size_gb * 1e9 / 3 / LAYERS / 4
    return max(64, round(math.sqrt(per_layer_elements) / 64) * 64)


def build_model(device: str, size_gb: float) -> distsave.Model:
    """The benchmark's model on ``device``: compiled with Adam, after one training step."""
    width = layer_width(size_gb)
    torch.manual_seed(0)
    with distsave.OneDeviceStrategy(device).scope():
        with torch.device(device):
            layers = [nn.Linear(width, width) for _ in range(LAYERS)]
        model = distsave.Sequential(layers, input_spec=distsave.TensorSpec((None, width)))
        model.compile(optimizer="adam", loss="mse", jit_compile=False)
        batch = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one CPU thread sums in one order: every process builds the same bytes
        try:
            model.fit(batch, batch, batch_size=4, epochs=1, verbose=0)
        finally:
            torch.set_num_threads(threads)
    return model


def flat_state(model: distsave.Model) -> Tensors:
    """Weights and optimizer tensors under one flat namespace, as the peers save them."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for param, state in model.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{names[id(param)]}/{key}"] = value
    return tensors


def fingerprint(tensors: Tensors) -> dict[str, int]:
    """A sum of each tensor's 64-bit words (wrapping; bytes where the size is odd): any changed
    value changes it."""
    def one(t: torch.Tensor) -> int:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if raw.storage_offset() % 8:
            raw = raw.clone()  # a view into a packed buffer: align it so it can be read as words
        words = raw.view(torch.int64) if raw.numel() % 8 == 0 else raw.to(torch.int64)
        return int(words.sum())
    return {name: one(t) for name, t in sorted(tensors.items())}


def touch_every_page(tensors: Tensors) -> None:
    """Read one byte of every 4 KiB page, so lazily mapped (mmap) tensors are really read."""
    for t in tensors.values():
        raw = t.detach().reshape(-1).view(torch.uint8)
        if raw.numel():
            raw[::4096].sum().item()
            raw[-1].item()


def layout_of(tensors: Tensors) -> Layout:
    return {"names": list(tensors), "shapes": [list(t.shape) for t in tensors.values()],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
            "fingerprint": fingerprint(tensors)}


def empty_like_layout(layout: Layout, device: str) -> Tensors:
    return {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            for name, shape, dtype in zip(layout["names"], layout["shapes"], layout["dtypes"])}


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- disk ceiling: WRITERS threads, each its own file, from (pinned) host memory ----------------
def _ranges(total: int) -> list[tuple[int, int]]:
    step = -(-total // WRITERS)
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def _host_buffer(total: int, device: str) -> torch.Tensor:
    return torch.empty(total, dtype=torch.uint8, pin_memory=device.startswith("cuda"))


def _layout_bytes(layout: Layout) -> int:
    return sum(math.prod(shape) * getattr(torch, dtype).itemsize
               for shape, dtype in zip(layout["shapes"], layout["dtypes"]))


def _views(buffer: torch.Tensor, layout: Layout) -> Tensors:
    """The tensors of ``layout`` as views of ``buffer``, packed back to back."""
    views, offset = {}, 0
    for name, t in empty_like_layout(layout, "meta").items():
        nbytes = t.numel() * t.element_size()
        views[name] = buffer[offset:offset + nbytes].view(t.dtype).reshape(t.shape)
        offset += nbytes
    return views


def save_ceiling(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    tensors = flat_state(model)
    layout = layout_of(tensors)
    buffer = _host_buffer(_layout_bytes(layout), next(model.parameters()).device.type)
    for view, t in zip(_views(buffer, layout).values(), tensors.values()):
        view.copy_(t)
    memory = memoryview(buffer.numpy())
    folder.mkdir(parents=True)

    def run() -> None:
        write_parts(folder, "part", memory)
        fsync_path(folder)
    return run


def write_parts(folder: Path, prefix: str, memory: memoryview) -> None:
    """The disk ceiling's write: WRITERS threads, each its part of ``memory`` into its own file
    ``{prefix}-{i}.bin``, fsync'd."""
    def write(part: int, start: int, end: int) -> None:
        fd = os.open(folder / f"{prefix}-{part}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            position = start
            while position < end:
                position += os.pwrite(fd, memory[position:min(end, position + CHUNK)], position - start)
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(lambda a: write(*a), ((i, *r) for i, r in enumerate(_ranges(len(memory))))))


def load_ceiling(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    buffer = _host_buffer(_layout_bytes(layout), device).zero_()  # faulted in now, not while timed
    views = _views(buffer, layout)
    memory = memoryview(buffer.numpy())

    def run() -> Tensors:
        read_parts(folder, "part", memory)
        return views
    return run


def read_parts(folder: Path, prefix: str, memory: memoryview) -> None:
    """The disk ceiling's read: what `write_parts` wrote, back into ``memory``."""
    def read(part: int, start: int, end: int) -> None:
        fd = os.open(folder / f"{prefix}-{part}.bin", os.O_RDONLY)
        try:
            position = start
            while position < end:
                got = os.preadv(fd, [memory[position:min(end, position + CHUNK)]], position - start)
                if got == 0:
                    raise EOFError(f"{folder}/{prefix}-{part}.bin ends early")
                position += got
        finally:
            os.close(fd)

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(lambda a: read(*a), ((i, *r) for i, r in enumerate(_ranges(len(memory))))))


# -- peers ----------------------------------------------------------------------------------------
def save_torch(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    tensors = flat_state(model)
    folder.mkdir(parents=True)

    def run() -> None:
        with open(folder / "state.pt", "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(folder)
    return run


def load_torch(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    return lambda: torch.load(folder / "state.pt", mmap=True, weights_only=True, map_location=device)


def save_safetensors(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    from safetensors.torch import save_file

    tensors = flat_state(model)
    folder.mkdir(parents=True)

    def run() -> None:
        save_file(tensors, folder / "state.safetensors")
        fsync_path(folder / "state.safetensors")
        fsync_path(folder)
    return run


def load_safetensors(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    from safetensors.torch import load_file

    return lambda: load_file(folder / "state.safetensors", device=device)


def save_dcp(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp

    tensors = flat_state(model)

    def run() -> None:
        dcp.save(tensors, checkpoint_id=folder, no_dist=True)  # FileSystemWriter fsyncs each file
    return run


def load_dcp(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    import torch.distributed.checkpoint as dcp

    def run() -> Tensors:
        tensors = empty_like_layout(layout, device)  # DCP loads in place, so allocation counts
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
        return tensors
    return run


def load_fastsafetensors(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    return fastsafetensors_reader([folder / "state.safetensors"], device, layout["names"])


def fastsafetensors_reader(paths: list[Path], device: str, names: list[str] | None) -> Callable[[], Tensors]:
    """fastsafetensors loading ``paths`` onto ``device``: the tensors ``names`` (None: all)."""
    try:
        from fastsafetensors import SafeTensorsFileLoader
    except ImportError as error:
        raise Unavailable(f"fastsafetensors is not installed ({error})") from error

    def run() -> Tensors:
        loader = SafeTensorsFileLoader(None, device, nogds=True)  # no GPUDirect Storage assumed
        loader.add_filenames({0: [str(path) for path in paths]})
        files = loader.copy_files_to_device()
        tensors = {name: files.get_tensor(name) for name in (list(files.key_to_rank_lidx) if names is None else names)}
        loader.close()
        return tensors
    return run


def load_runai(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    try:
        from runai_model_streamer import SafetensorsStreamer
    except ImportError as error:
        raise Unavailable(f"runai-model-streamer is not installed ({error})") from error

    def run() -> Tensors:
        tensors = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(folder / "state.safetensors"))
            for name, tensor in streamer.get_tensors():  # views of a reused buffer: copy each
                tensors[name] = tensor.to(device) if device != "cpu" else tensor.clone()
        return tensors
    return run


# -- distsave -------------------------------------------------------------------------------------
def save_distsave(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    def run() -> None:
        model.save(str(folder))
    return run


def check_async_api() -> None:
    if not hasattr(distsave, "wait_for_saves"):
        raise Unavailable("distsave.wait_for_saves does not exist")


def save_distsave_async(model: distsave.Model, folder: Path) -> Callable[[], Any]:
    check_async_api()

    def save() -> float:
        start = time.perf_counter()
        try:
            model.save(str(folder), blocking=False)
        except TypeError as error:
            if "blocking" in str(error):
                raise Unavailable(f"model.save has no blocking=False ({error})") from error
            raise
        return time.perf_counter() - start

    first_blocked = save()  # a training run's first checkpoint: copies and program made anew
    distsave.wait_for_saves()

    def run() -> dict[str, float]:
        blocked = save()  # every later checkpoint: the steady state that training sees
        distsave.wait_for_saves()
        return {"blocked_s": blocked, "first_blocked_s": first_blocked}
    return run


def load_distsave(folder: Path, device: str, layout: Layout) -> Callable[[], Tensors]:
    def run() -> Tensors:
        with distsave.OneDeviceStrategy(device).scope():
            return flat_state(distsave.load_model(str(folder)))
    return run


SAVES: dict[str, Callable[[distsave.Model, Path], Callable[[], Any]]] = {
    "ceiling": save_ceiling, "torch": save_torch, "safetensors": save_safetensors, "dcp": save_dcp,
    "distsave": save_distsave, "distsave-first": save_distsave, "distsave-async": save_distsave_async,
}
LOADS: dict[str, Callable[[Path, str, Layout], Callable[[], Tensors]]] = {
    "ceiling": load_ceiling, "torch": load_torch, "safetensors": load_safetensors, "dcp": load_dcp,
    "fastsafetensors": load_fastsafetensors, "runai": load_runai, "distsave": load_distsave,
}


# -- measuring one step ---------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Start VmHWM afresh (Linux >= 4.0), so the peak is the measured step's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def drop_page_cache(method: str, folder: Path) -> None:
    """Evict ``folder``'s files from the page cache: drop_caches (root) or fadvise per file."""
    os.sync()
    if method == "drop_caches":
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _prepare(task: dict[str, Any]) -> tuple[Callable[[], Any], Layout]:
    """The untimed part: build the model (saves) or read the layout and drop the cache (loads)."""
    device, folder = task["device"], Path(task["folder"])
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is not part of any way's time
    if task["way"] == "distsave-async":
        check_async_api()  # before building a model for nothing
    if task["op"] == "save":
        model = build_model(device, task["size_gb"])
        return SAVES[task["way"]](model, folder), layout_of(flat_state(model))
    layout = json.loads(Path(task["layout"]).read_text())
    step = LOADS[task["way"]](folder, device, layout)
    drop_page_cache(task["cache"], folder)
    return step, layout


def program_cache_state() -> str:
    """Whether this process's first distsave save finds its serving program in the cache."""
    from distsave.saving.program_cache import cache_folder

    folder = cache_folder()
    return "off" if folder is None else ("hit" if any(folder.glob("*.json")) else "miss")


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """Run the task's step once and return what was measured."""
    device, folder = task["device"], Path(task["folder"])
    cache = program_cache_state() if task["way"].startswith("distsave") and task["op"] == "save" else None
    step, layout = _prepare(task)
    gc.collect()
    os.sync()  # earlier writes and deletions (discards) are flushed now, not inside the timing
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = {"program_cache": cache, "peak_reset": _reset_peak_rss(), "rss_before": _status_bytes("VmRSS"),
              "cuda_before": torch.cuda.memory_allocated(device) if on_cuda else 0}
    start = time.perf_counter()
    outcome = step()
    _sync(device)
    if task["op"] == "load" and not on_cuda:
        touch_every_page(outcome)  # an mmap load returns before reading: time it until it has
    result["seconds"] = time.perf_counter() - start
    result["rss_peak"] = max(result["rss_before"], _status_bytes("VmHWM"))
    result["cuda_peak"] = torch.cuda.max_memory_allocated(device) if on_cuda else 0
    result["files_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if task["op"] == "save":
        Path(task["layout"]).write_text(json.dumps(layout))
        result.update(checkpoint_bytes=_layout_bytes(layout),
                      fingerprint_total=sum(layout["fingerprint"].values()), **(outcome or {}))
    else:
        wrong = sorted(set(fingerprint(outcome).items()) ^ set(layout["fingerprint"].items()))
        result.update(checkpoint_bytes=sum(t.numel() * t.element_size() for t in outcome.values()),
                      verified=not wrong, mismatched=sorted({name for name, _ in wrong})[:5])
    return result


def main() -> None:
    task = json.loads(sys.argv[1])
    try:
        result = {"status": "ok", **measure(task)}
    except Unavailable as reason:
        result = {"status": "n/a", "reason": str(reason)}
    Path(task["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
