"""ShardedStrategy: data parallelism with every parameter sharded over the replicas (FSDP2).

Each replica keeps only its rows of every parameter, gradient and optimizer state (dim-0
chunks, as ``torch.chunk`` cuts them); FSDP2 all-gathers a block's parameters just before the
block runs and reduce-scatters its gradients after. Launching, data splitting and collectives
are MirroredStrategy's, so Sharded×N trains like Mirrored×N, with 1/N of the memory per replica.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parameter import UninitializedParameter

from .mirrored import MirroredStrategy, _settle

__all__ = ["ShardedStrategy", "ShardingPolicy"]

ShardingPolicy = Callable[[nn.Module], bool] | Iterable[type[nn.Module]]
_MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: shard what they hold
_TRAINING_COPIES = 4  # weights + gradients + two optimizer moments (Adam), per parameter byte


def _mixed_precision(spec: str | MixedPrecisionPolicy | None) -> MixedPrecisionPolicy | None:
    if spec is None or isinstance(spec, MixedPrecisionPolicy):
        return spec
    if isinstance(spec, str) and spec.lower() in _MIXED_PRECISION:
        dtype = _MIXED_PRECISION[spec.lower()]
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    raise ValueError(f"Expected mixed_precision=None, 'bf16-mixed' or a "
                     f"torch.distributed.fsdp.MixedPrecisionPolicy. Received: {spec!r}.")


def _root_policy(blocks: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """The root's policy: blocks cast their own inputs (the root's hook would run before the
    model checks its inputs against its spec), and outputs leave in float32 unless told."""
    return dataclasses.replace(blocks, cast_forward_inputs=False,
                               output_dtype=blocks.output_dtype or torch.float32)


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _default_blocks(root: nn.Module) -> list[nn.Module]:
    """The direct children holding parameters of the network under ``root`` (a chain of
    single-child wrappers such as ``Model(nn.Sequential(...))`` is looked through), with
    ``ModuleList``/``ModuleDict`` containers replaced by what they hold."""
    body = root
    while len(children := list(body.children())) == 1 and not list(body.parameters(recurse=False)):
        body = children[0]
    blocks, pending = [], [c for c in body.children() if c is not root]
    while pending:
        module = pending.pop(0)
        if isinstance(module, _CONTAINERS):
            pending[:0] = list(module.children())
        elif _holds_parameters(module):
            blocks.append(module)
    return blocks


def _policy_blocks(root: nn.Module, policy: ShardingPolicy) -> list[nn.Module]:
    """The modules below ``root`` that ``policy`` picks, innermost first (FSDP's order)."""
    if isinstance(policy, type) or not callable(policy):
        classes = (policy,) if isinstance(policy, type) else tuple(policy)
        if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"Expected policy as a callable module -> bool or a set of nn.Module "
                            f"classes. Received: {policy!r}.")
        picks = lambda module: isinstance(module, classes)  # noqa: E731
    else:
        picks = policy
    chosen = [m for m in root.modules() if m is not root and picks(m)]
    return [m for m in reversed(chosen) if _holds_parameters(m)]


def _available_bytes(device: torch.device) -> int | None:
    """Memory this replica may still take on ``device``: free GPU memory, or on CPUs the host's
    available memory split over the replicas on this machine; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return int(fields["MemAvailable"].split()[0]) * 1024 // local


def _local_bytes(module: nn.Module, world: int, rank: int) -> int:
    """Bytes replica ``rank`` of ``world`` will hold of ``module`` once sharded: its rows of
    every parameter (cut as ``torch.chunk`` and FSDP2 cut them) and every buffer whole."""
    total = 0
    for p in module.parameters():
        length = p.shape[0] if p.ndim else 1
        chunks = torch.chunk(torch.empty(length, device="meta"), world)
        rows = len(chunks[rank]) if rank < len(chunks) else 0
        total += p.numel() // max(length, 1) * rows * p.element_size()
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class ShardedStrategy(MirroredStrategy):
    """Fully sharded data parallelism (FSDP2): each replica holds 1/N of every parameter,
    gradient and optimizer state, so models too big for one device train on N of them.

    Launched as MirroredStrategy is (a plain ``python script.py`` starts the other replica
    processes; ``torchrun`` processes join). A model built in ``scope()`` stays on the host
    until ``compile`` (or ``fit``/``evaluate``/``predict``) shards it: FSDP2's ``fully_shard``
    wraps each block (each direct child of the network holding parameters, or what ``policy``
    picks) and then the root; every replica then receives replica 0's rows for its shard and
    moves only those to its device, so all replicas start from the same weights and no device
    ever holds the whole model.

    Args:
        devices: Replica devices, all CPUs (gloo) or all GPUs (NCCL), as in MirroredStrategy.
        mixed_precision: None (fp32), ``"bf16-mixed"`` (bf16 compute, fp32 gradient reduction,
            fp32 weights), or a ``torch.distributed.fsdp.MixedPrecisionPolicy`` for the blocks.
            The model's outputs are float32 unless the policy names an ``output_dtype``.
        reshard_after_forward: Free each block's gathered parameters after its forward (less
            memory; gathered again for backward), as FSDP2's flag.
        policy: Which modules become FSDP blocks: a callable ``module -> bool`` or a set of
            module classes (e.g. ``{TransformerBlock}``). Default: the network's direct children.
        timeout: How long a collective may wait for a peer before failing.

    Raises:
        ValueError: bad devices (see MirroredStrategy) or an unknown ``mixed_precision``.

    Example:
        >>> strategy = ShardedStrategy(devices=["cpu"])
        >>> with strategy.scope():
        ...     model = Sequential([nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2)])
        ...     model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    """

    def __init__(self, devices: list[str] | None = None, *,
                 mixed_precision: str | MixedPrecisionPolicy | None = None,
                 reshard_after_forward: bool = True, policy: ShardingPolicy | None = None,
                 timeout: datetime.timedelta = datetime.timedelta(minutes=10)):
        self.mixed_precision = _mixed_precision(mixed_precision)
        self.reshard_after_forward = reshard_after_forward
        self.policy = policy
        super().__init__(devices, timeout)
        self.mesh = DeviceMesh.from_group(self._group, self.device.type)
        # Replica 0's initial values travel host to host, so no GPU ever stages a peer's rows.
        self._host_group = self._group if self._backend == "gloo" else dist.new_group(backend="gloo")

    def __repr__(self) -> str:
        return f"ShardedStrategy(replicas={self.num_replicas_in_sync}, device={self.device})"

    def describe(self) -> dict[str, Any]:
        precision = self.mixed_precision
        return {**super().describe(), "sharding": "fsdp2",
                "mixed_precision": None if precision is None else str(precision.param_dtype)}

    # -- models -------------------------------------------------------------------------
    def place_model(self, module: nn.Module) -> nn.Module:
        return self.apply_sharding(module)

    def prepare_for_training(self, module: nn.Module) -> nn.Module:
        return self.apply_sharding(module)  # FSDP2 shards in place: the module is its own wrapper

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Nothing to send: placing a host model (which follows in ``compile``, ``fit``,
        ``evaluate`` and ``predict``) gives each replica the chief's values, only its own rows of
        each parameter (`apply_sharding`), and a sharded model's tensors are each replica's own.
        Mirrored's broadcast would put the whole model on every device, twice."""

    def apply_sharding(self, module: nn.Module) -> nn.Module:
        """Shard ``module`` in place over this strategy's mesh and return it; a no-op if done.

        Blocks, then the root, go through ``fully_shard``. A module on ``meta`` stays there:
        the caller allocates the shards (``module.to_empty(device=strategy.device)``) and fills
        each parameter's ``to_local()`` rows. A materialised module (on the host) gets replica
        0's values: each replica receives only its rows, on its device.

        Raises:
            ValueError: a parameter has no shape yet (a lazy layer never called).
            MemoryError: on every replica, when some replica's shards with their gradients and
                optimizer state would not fit its device; raised before the module is touched.
        """
        if isinstance(module, FSDPModule):
            return module
        if any(isinstance(p, UninitializedParameter) for p in module.parameters()):
            raise ValueError(f"{type(module).__name__} has lazy parameters without a shape; "
                             "ShardedStrategy needs every shape to cut the shards. Call the model "
                             "once on an example batch, or use layers with explicit sizes.")
        self._check_memory(module)
        on_meta = [t for t in (*module.parameters(), *module.buffers()) if t.is_meta]
        host = None if on_meta else {**{n: p.detach() for n, p in module.named_parameters()},
                                     **{n: b.detach() for n, b in module.named_buffers()}}
        if host is not None:
            module.to("meta")  # the values wait in `host`; shards are allocated below, per rank
        blocks = (_default_blocks(module) if self.policy is None
                  else _policy_blocks(module, self.policy))
        options = {"mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.mixed_precision is not None:
            options["mp_policy"] = self.mixed_precision
        for block in blocks:
            fully_shard(block, **options)
        if self.mixed_precision is not None:
            options["mp_policy"] = _root_policy(self.mixed_precision)
        fully_shard(module, **options)
        if host is not None:
            module.to_empty(device=self.device)
            self._fill_from_chief(module, host)
        return module

    def _check_memory(self, module: nn.Module) -> None:
        """Fail on every replica, with the numbers, if some replica's shards cannot fit."""
        available = _available_bytes(self.device)
        needed = _local_bytes(module, self.num_replicas_in_sync, self.replica_id) * _TRAINING_COPIES
        short = torch.tensor([int(available is not None and needed > available)], device=self.device)
        if self.num_replicas_in_sync > 1:
            dist.all_reduce(short, group=self._group)
            self._settle(short)
        if short.item():
            mine = "" if available is None else f"; this replica has {_gib(available)} on {self.device}"
            raise MemoryError(
                f"ShardedStrategy: the model does not fit {self.num_replicas_in_sync} replica(s): "
                f"{int(short.item())} of them lack the memory for their shards. Each needs about "
                f"{_gib(needed)} ({_TRAINING_COPIES}× its {_gib(needed // _TRAINING_COPIES)} of "
                f"weights, for gradients and optimizer state){mine}. Use more replicas or devices "
                "with more memory, or a smaller model."
            )

    @torch.no_grad()
    def _fill_from_chief(self, module: nn.Module, host: dict[str, torch.Tensor]) -> None:
        """Give every replica replica 0's values: of each parameter only its own rows, of each
        buffer the whole; sent between host memories (gloo), then copied to this device."""
        world, rank, group = self.num_replicas_in_sync, self.replica_id, self._host_group
        for name, param in module.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            rows = torch.chunk(host[name], world) if host[name].ndim else [host[name]]
            if rank == 0:
                local.copy_(rows[0])
                for peer, part in enumerate(rows[1:], start=1):
                    if part.numel():
                        part = part.contiguous()
                        dist.send(part, group=group, group_dst=peer)
                        _settle([part])
            elif local.numel():
                received = torch.empty(local.shape, dtype=local.dtype)
                dist.recv(received, group=group, group_src=0)
                _settle([received])
                local.copy_(received)
        for name, buffer in module.named_buffers():
            value = host[name].contiguous()
            if world > 1:
                dist.broadcast(value, group=group, group_src=0)
                _settle([value])
            buffer.copy_(value)
