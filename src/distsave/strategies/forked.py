"""Replicas as forked processes, for programs that cannot be started again.

A plain ``python train.py`` gets its other replicas by running the script again (see
`launcher`). Inside Jupyter/IPython, pytest, ``python -c`` or any host whose ``sys.argv`` is not
the user's script that would start the host again, so there each ``fit``, ``evaluate`` and
``predict`` forks one process per replica instead (as Lightning's ``ddp_notebook`` does). The
calling process stays a controller on the CPU: it never joins the group and never touches
CUDA, so it can fork again for the next call. Replica 0 sends back what the call changed and
returned (weights, optimizer state, history or logs or predictions) as safetensors bytes and
JSON over a pipe; nothing is pickled.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

if TYPE_CHECKING:
    from ..training.model import Model
    from .mirrored import MirroredStrategy

__all__ = ["ForkedReplicasError", "check_can_fork", "run_in_forked_replicas"]

_OK, _FAILED = b"K", b"F"
_HEADER = struct.Struct("<cQQ")  # status, JSON length, tensor bytes length


class ForkedReplicasError(RuntimeError):
    """A forked replica failed; the message holds its traceback."""


def _working_options(replicas: int) -> str:
    return (f"Run the program as a script (`python train.py` starts its {replicas} replicas itself), "
            f"start it with `torchrun --nproc_per_node {replicas} train.py`, or use one replica "
            "(MirroredStrategy(devices=['cuda:0']))")


def check_can_fork(devices: list[torch.device]) -> None:
    """Raise if forking replicas here would give broken children (CUDA or a process group in use)."""
    if devices[0].type == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError(
            f"MirroredStrategy over {len(devices)} GPUs in a program that cannot be started again "
            "(Jupyter/IPython, pytest, python -c) forks one process per replica, and a forked "
            "process cannot use CUDA once this process has initialised it, which it has (a tensor "
            "was put on a GPU, a torch.cuda call made, or a model saved whose classes a fresh "
            "process cannot import, such as classes defined in the notebook: its serving program "
            "was exported here; define them in a module). Restart the kernel/process and create the "
            "strategy before any GPU work; or " + _working_options(len(devices)) + ".")
    if dist.is_initialized():
        raise RuntimeError(
            f"MirroredStrategy over {len(devices)} replicas forks its replica processes, but this "
            "process already has a torch.distributed process group, which forked processes "
            "cannot use. Create the strategy before any other one in this process; or "
            + _working_options(len(devices)) + ".")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_forked_replicas(strategy: MirroredStrategy, fn: Callable[..., Any], model: Model,
                           *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(model, *args, **kwargs)`` on every replica (forked); replica 0's result, and
    the model state it leaves, come back to this process."""
    devices = strategy.replica_devices
    check_can_fork(devices)
    port = _free_port()
    children: dict[int, tuple[int, int]] = {}  # rank -> (pid, read end of its pipe)
    for rank in range(len(devices)):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _replica_main(strategy, rank, port, write_end, fn, model, args, kwargs)
        os.close(write_end)
        children[rank] = (pid, read_end)
    messages = _collect(children, strategy.timeout)
    failed = [(rank, m) for rank, m in messages.items() if m is None or m[0] != _OK]
    if failed:  # the first to fail is the cause; the others saw their peer vanish
        rank, message = failed[0]
        detail = (message[1].decode(errors="replace") if message is not None
                  else "it exited without a result (killed, or it crashed in native code)")
        raise ForkedReplicasError(f"Replica {rank} of {len(devices)} (forked, on {devices[rank]}) "
                                  f"failed:\n{detail}")
    _, meta, blob = messages[0]
    outcome = json.loads(meta)
    sys.stdout.write(outcome["output"][0])
    sys.stderr.write(outcome["output"][1])
    return _adopt(model, outcome, load_tensors(blob) if blob else {})


def _collect(children: dict[int, tuple[int, int]], timeout: datetime.timedelta
             ) -> dict[int, tuple[bytes, bytes, bytes] | None]:
    """Each child's message (None if it died without one), in the order they ended. When one
    fails, the others are killed at once: they would otherwise wait in a collective until the
    timeout."""
    buffers = {fd: bytearray() for _, fd in children.values()}
    rank_of = {fd: rank for rank, (_, fd) in children.items()}
    results: dict[int, tuple[bytes, bytes, bytes] | None] = {}
    open_fds = set(buffers)
    deadline = timeout.total_seconds() + 60
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], deadline)
        if not ready:
            _kill(children, results)
            raise ForkedReplicasError(f"Forked replicas sent nothing for {deadline:.0f} s; killed them.")
        for fd in ready:
            chunk = os.read(fd, 1 << 20)
            if chunk:
                buffers[fd] += chunk
                continue
            open_fds.discard(fd)
            os.close(fd)
            results[rank_of[fd]] = _parse(bytes(buffers[fd]))
            if results[rank_of[fd]] is None or results[rank_of[fd]][0] != _OK:
                _kill(children, results)
    for pid, _ in children.values():
        os.waitpid(pid, 0)
    return results


def _kill(children: dict[int, tuple[int, int]], done: dict) -> None:
    for rank, (pid, _) in children.items():
        if rank not in done:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _parse(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    if len(data) < _HEADER.size:
        return None
    status, meta_len, blob_len = _HEADER.unpack_from(data)
    body = data[_HEADER.size:]
    if len(body) != meta_len + blob_len:
        return None
    return status, body[:meta_len], body[meta_len:]


def _replica_main(strategy: MirroredStrategy, rank: int, port: int, pipe: int,
                  fn: Callable[..., Any], model: Model, args: tuple, kwargs: dict) -> None:
    """The forked replica: join a fresh group, run ``fn``, send the outcome, leave (never returns)."""
    status, meta, blob = _FAILED, b"", b""
    captured = io.StringIO(), io.StringIO()  # the host's streams (a kernel's) are not the child's
    try:
        sys.stdout, sys.stderr = captured
        strategy.become_replica(rank, f"tcp://127.0.0.1:{port}")
        result = fn(model, *args, **kwargs)
        if rank == 0:
            meta_dict, tensors = _describe(model, result)
            meta_dict["output"] = [captured[0].getvalue(), captured[1].getvalue()]
            meta, blob = json.dumps(meta_dict).encode(), save_tensors(tensors) if tensors else b""
        if strategy.device.type == "cuda":
            torch.cuda.synchronize(strategy.device)
        dist.destroy_process_group()
        status = _OK
    except BaseException:  # noqa: BLE001 - every failure, SystemExit included, goes to the parent
        meta = (captured[1].getvalue()[-4000:] + traceback.format_exc()).encode()
    finally:
        try:
            os.write(pipe, _HEADER.pack(status, len(meta), len(blob)))
            _write_all(pipe, meta + blob)
        finally:
            os._exit(0 if status == _OK else 1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- what a call changed, there and back --------------------------------------------------
def _describe(model: Model, result: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Replica 0's outcome as JSON plus named tensors: the model's state, its optimizer's, the result."""
    from ..training.callbacks import History

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"epoch": model.epoch, "step": model.step,
                            "stop_training": bool(getattr(model, "stop_training", False)),
                            "input_spec": [spec.to_json() for spec in model.input_spec or []]}
    if model.optimizer is not None:
        state = model.optimizer.state_dict()
        meta["optimizer"] = {"groups": json.loads(json.dumps(state["param_groups"], default=float)),
                             "scalars": {}}
        for index, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
                else:
                    meta["optimizer"]["scalars"][f"{index}/{key}"] = value
    if isinstance(result, History):
        meta["result"] = {"history": result.history, "epochs": result.epoch}
    elif isinstance(result, torch.Tensor):
        meta["result"] = {"tensor": True}
        tensors["result"] = result.detach().cpu().contiguous()
    else:
        meta["result"] = {"logs": result}
    return meta, tensors


def _adopt(model: Model, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """Put replica 0's outcome into this process's model; return its result."""
    from ..training.callbacks import History
    from ..training.specs import TensorSpec

    if meta["input_spec"]:  # the first batch of a fit records the inputs
        model.input_spec = [TensorSpec.from_json(spec) for spec in meta["input_spec"]]
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    model.epoch, model.step, model.stop_training = meta["epoch"], meta["step"], meta["stop_training"]
    if "optimizer" in meta and model.optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer/"):
                _, index, key = name.split("/", 2)
                state.setdefault(int(index), {})[key] = value
        for name, value in meta["optimizer"]["scalars"].items():
            index, key = name.split("/", 1)
            state.setdefault(int(index), {})[key] = value
        model.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["groups"]})
    result = meta["result"]
    if "history" in result:
        history = History()
        history.history, history.epoch = result["history"], result["epochs"]
        history.set_model(model)
        return history
    if "tensor" in result:
        return tensors["result"]
    return result["logs"]
