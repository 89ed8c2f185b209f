"""MirroredStrategy: synchronous data parallelism, one process per replica, DDP underneath."""

from __future__ import annotations

import atexit
import datetime
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy
from .devices import parse_device
from .forked import check_can_fork, run_in_forked_replicas
from .launcher import launch_replicas, launched_by_torchrun_or_distsave, program_can_restart

__all__ = ["MirroredStrategy", "MultiWorkerMirroredStrategy"]


def _replica_devices(devices: list[str] | None, world_size: int | None) -> list[torch.device]:
    if devices is not None:
        if not devices:
            raise ValueError("Expected at least one device in MirroredStrategy(devices=[...]).")
        kinds = {parse_device(d, must_exist=False).type for d in devices}
        if len(kinds) > 1:
            raise ValueError(
                f"MirroredStrategy replicas must all be CPUs or all be GPUs. Received: {devices}. "
                "Use devices=['cpu', 'cpu'] or devices=['cuda:0', 'cuda:1']."
            )
        parsed = [parse_device(d) for d in devices]
        gpus = [d for d in parsed if d.type == "cuda"]
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"Each GPU may hold one replica. Received: {devices}.")
        return parsed
    if world_size is not None:  # started by torchrun: one replica per process
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))  # many machines: index by local rank
            return [torch.device("cuda", local)] * world_size
        return [torch.device("cpu")] * world_size
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


_SETTLE_SECONDS = 10.0  # a bound, so a stuck worker can never hang the caller


def _settle(tensors: Sequence[torch.Tensor]) -> None:
    """Wait (GIL released) until gloo's worker threads have let go of ``tensors``.

    A gloo worker thread drops its references to a finished collective's tensors a moment
    after the caller wakes up. If the worker holds the last reference to a tensor that
    Python created, dropping it takes the GIL; when that happens during interpreter shutdown
    the thread is killed inside C++ and the process aborts ("terminate called without an
    active exception"). Waiting here keeps the last reference on the Python side.
    """
    deadline = time.monotonic() + _SETTLE_SECONDS
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0)


def _cpu_threads_per_replica(replicas: int) -> int | None:
    """The intra-op thread count for one of ``replicas`` processes sharing this machine's
    CPUs, or None to leave the process's setting alone (one replica, or the user chose
    one with OMP_NUM_THREADS). It only ever lowers the count, never raises it."""
    if replicas == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // replicas))


def _leave_group() -> None:
    """Tear the group down before interpreter shutdown (else its threads may abort the process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class MirroredStrategy(Strategy):
    """Synchronous training over several replicas of the model, one process each.

    Started as a plain ``python script.py``, it launches the other replica processes itself
    (they run the same command); started by ``torchrun``, it joins torchrun's processes. In a
    program that cannot be run again (Jupyter/IPython, pytest, ``python -c``) each ``fit``,
    ``evaluate`` and ``predict`` forks one process per replica and this process keeps the model
    on the CPU between calls (for GPUs: create the strategy before any CUDA work; ``model.save``
    exports the serving program in a helper process, as torch.export would initialise CUDA here,
    where the model's classes can be imported there). Gradients are
    averaged with DDP: NCCL on GPUs, gloo on CPUs.

    Args:
        devices: Replica devices, all CPUs or all GPUs (``["cpu", "cpu"]``,
            ``["cuda:0", "/gpu:1"]``). Default: every local GPU, or one CPU replica.
        timeout: How long a collective may wait for a peer before failing.

    Raises:
        ValueError: a device does not exist, or the list mixes CPUs and GPUs, or the
            list's length differs from the number of processes torchrun started.

    Example:
        >>> strategy = MirroredStrategy(devices=["cpu"])
        >>> strategy.num_replicas_in_sync
        1
    """

    def __init__(self, devices: list[str] | None = None,
                 timeout: datetime.timedelta = datetime.timedelta(minutes=10)):
        external = launched_by_torchrun_or_distsave()
        world = int(os.environ["WORLD_SIZE"]) if external else None
        replica_devices = _replica_devices(devices, world)
        if world is not None and len(replica_devices) != world:
            raise ValueError(
                f"MirroredStrategy was given {len(replica_devices)} devices but {world} processes "
                "were started (WORLD_SIZE). Pass as many devices as processes, or devices=None."
            )
        self.replica_devices, self.timeout = replica_devices, timeout
        self.num_replicas_in_sync = len(replica_devices)
        self._backend = "nccl" if replica_devices[0].type == "cuda" else "gloo"
        self.forks = not external and self.num_replicas_in_sync > 1 and not program_can_restart()
        if self.forks:  # a controller: replicas are forked per call (see `forked`)
            check_can_fork(replica_devices)
            self.replica_id, self.device, self._group = 0, torch.device("cpu"), None
            return
        if not external and self.num_replicas_in_sync > 1:
            launch_replicas(self.num_replicas_in_sync)
            external = True
        self.replica_id = int(os.environ["RANK"]) if external else 0
        self._use_device(replica_devices[self.replica_id])
        self._group = self._join_group(external, timeout)

    def _use_device(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif (threads := _cpu_threads_per_replica(self.num_replicas_in_sync)) is not None:
            torch.set_num_threads(threads)

    def become_replica(self, rank: int, init_method: str) -> None:
        """In a forked child: be replica ``rank`` and join the call's fresh process group.

        One intra-op thread: GNU OpenMP's pool, if the parent used it, is dead in a forked
        child and waiting for it hangs (a replica has a GPU or shares the cores anyway)."""
        torch.set_num_threads(1)
        self.replica_id, self.forks = rank, False
        self._use_device(self.replica_devices[rank])
        dist.init_process_group(self._backend, init_method=init_method, rank=rank,
                                world_size=self.num_replicas_in_sync, timeout=self.timeout)
        self._group = dist.group.WORLD

    def call_on_replicas(self, fn: Callable[..., Any], model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``fn(model, ...)`` on every replica; forked here when this program cannot be re-run."""
        if self.forks:
            return run_in_forked_replicas(self, fn, model, *args, **kwargs)
        return fn(model, *args, **kwargs)

    def _join_group(self, external: bool, timeout: datetime.timedelta) -> dist.ProcessGroup:
        if dist.is_initialized():
            if dist.get_world_size() != self.num_replicas_in_sync:
                raise RuntimeError(
                    f"A process group of {dist.get_world_size()} processes already exists; "
                    f"MirroredStrategy needs {self.num_replicas_in_sync}. Use one replica count "
                    "per program."
                )
            if dist.get_backend() == self._backend:
                return dist.group.WORLD
            return dist.new_group(backend=self._backend)
        if external:
            dist.init_process_group(self._backend, timeout=timeout)
        else:
            dist.init_process_group(self._backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        atexit.register(_leave_group)
        return dist.group.WORLD

    def __repr__(self) -> str:
        return f"MirroredStrategy(replicas={self.num_replicas_in_sync}, device={self.device})"

    def _settle(self, *tensors: torch.Tensor) -> None:
        if self._backend == "gloo":
            _settle(tensors)

    def barrier(self) -> None:
        if self._group is None:
            return
        if self._backend == "nccl":
            dist.barrier(group=self._group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self._group)

    def broadcast_object(self, obj: Any) -> Any:
        """The chief's JSON-able ``obj`` on every replica (sent as UTF-8 JSON, never pickled)."""
        if self._group is None:
            return obj
        payload = json.dumps(obj).encode() if self.is_chief else b""
        size = torch.tensor([len(payload)], dtype=torch.long, device=self.device)
        dist.broadcast(size, src=0, group=self._group)
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if self.is_chief
                else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(data, src=0, group=self._group)
        self._settle(size, data)
        return json.loads(bytes(data.cpu().tolist()).decode())

    def prepare_for_training(self, module: nn.Module) -> nn.Module:
        if self.num_replicas_in_sync == 1:
            return module  # nothing to average: skip DDP's per-step hooks
        if self.device.type != "cuda":
            return DistributedDataParallel(module, process_group=self._group)
        # Built on a side stream, as CUDA-graph capture of the step needs: DDP creates the
        # parameters' gradient accumulators now, and autograd later syncs each with the stream
        # current here; the legacy default stream may not depend on a capturing one.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            wrapped = DistributedDataParallel(module, device_ids=[self.device.index], process_group=self._group)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return wrapped

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._group is None:
            return tensor.clone()
        out = tensor.clone()
        dist.all_reduce(out, group=self._group)
        self._settle(out)
        return out

    def _all_gather(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        if self._group is None:
            return tensor
        tensor = tensor.movedim(axis, 0).contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device)
                 for _ in range(self.num_replicas_in_sync)]
        size = torch.tensor([len(tensor)], device=self.device)
        dist.all_gather(sizes, size, group=self._group)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self._group)
        self._settle(size, *sizes, *parts, padded)
        whole = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
        return whole.movedim(0, axis)


class MultiWorkerMirroredStrategy(MirroredStrategy):
    """MirroredStrategy over several machines: one replica per local GPU (or one CPU replica)
    on each, all started by ``torchrun --nnodes M --nproc_per_node N ...``.

    Raises:
        RuntimeError: the program was not started by torchrun (or a launcher that sets
            RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).
    """

    def __init__(self, timeout: datetime.timedelta = datetime.timedelta(minutes=10)):
        if not launched_by_torchrun_or_distsave():
            raise RuntimeError("MultiWorkerMirroredStrategy joins processes started on every machine: "
                               "run `torchrun --nnodes M --nproc_per_node N --rdzv-endpoint HOST:PORT "
                               "train.py` on each, or use MirroredStrategy on one machine.")
        super().__init__(devices=None, timeout=timeout)
