"""The multi-replica train step captured as one CUDA graph, gradient all-reduce included.

Eager DDP launches hundreds of small kernels per step and all-reduces bucket by bucket from
autograd hooks; for a small model on fast GPUs that launch and hook cost, not arithmetic,
sets the step time. Here every gradient is a view of one flat buffer, so a step is: forward,
backward (filling the buffer), one NCCL all-reduce (average) of the buffer, the optimizer
step and the metric sums, captured once and replayed per batch. NCCL collectives are
graph-capturable; the replicas all capture at the same step, so the recorded all-reduces pair up.

The replicas start equal because the DDP wrapper `prepare_for_training` built broadcast
replica 0's parameters; its per-step hooks stay idle, since the step calls the bare model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..strategies import Strategy
from .metrics import Metric
from .steps import CapturedTrainStep, TrainStep
from .structures import batch_rows

if TYPE_CHECKING:
    from .model import Model

__all__ = ["CapturedReplicaStep", "replica_capture_blocker"]

logger = logging.getLogger(__name__)


def replica_capture_blocker(model: Model, strategy: Strategy) -> str | None:
    """Why the multi-replica step cannot be captured here, or None if it can."""
    group = getattr(strategy, "_group", None)
    if group is None or dist.get_backend(group) != "nccl":
        return "the replicas do not talk through NCCL"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return "the model has no trainable parameters"
    if len({p.dtype for p in params}) > 1:
        return "the parameters have several dtypes (one flat gradient buffer needs one)"
    if not all(p.is_contiguous() for p in params):
        return "a parameter is not contiguous"
    return None


class CapturedReplicaStep(CapturedTrainStep):
    """`CapturedTrainStep` for several replicas: gradients live in one flat buffer that is
    averaged over replicas with one all-reduce before the optimizer step (eager or captured)."""

    # NCCL's watchdog thread queries CUDA events while this thread captures; in the default
    # "global" mode that breaks the capture ("operation failed due to a previous error").
    capture_error_mode = "thread_local"

    def __init__(self, model: Model, module: nn.Module, strategy: Strategy, metrics: list[Metric]):
        bare = module.module if isinstance(module, DistributedDataParallel) else module
        super().__init__(model, bare, strategy, metrics)
        params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=strategy.device)
        offset = 0
        for p in params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.group = strategy._group
        dist.all_reduce(self.flat, op=dist.ReduceOp.AVG, group=self.group)  # NCCL's communicator, now

    def __call__(self, x: torch.Tensor, y: torch.Tensor, global_size: int) -> None:
        if batch_rows(y) * self.strategy.num_replicas_in_sync != global_size:  # uneven shards: eager, scaled
            TrainStep.__call__(self, x, y, global_size)
            return
        super().__call__(x, y, global_size)

    def _apply(self) -> None:
        dist.all_reduce(self.flat, op=dist.ReduceOp.AVG, group=self.group)
        self.model.optimizer.step()
        self.flat.zero_()  # the grads stay views of the buffer (zero_grad(set_to_none) would drop them)

    def end(self) -> None:
        super().end()
        for p in self.model.parameters():
            p.grad = None
