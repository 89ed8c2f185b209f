"""Train steps: one optimisation step per batch, metrics summed on the device.

`TrainStep` runs eagerly anywhere. `CapturedTrainStep` records the whole step (forward,
backward, optimizer, metric sums) once as a CUDA graph and replays it per batch, which removes
the per-kernel launch cost that bounds small models; batches of another shape (the last,
smaller one) run eagerly. If capture fails, ``jit_compile="auto"`` falls back to eager with one
log line and ``jit_compile=True`` raises with the reason.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..strategies import Strategy
from .metrics import Metric
from .specs import describe_tensor
from .structures import batch_rows, call_model

if TYPE_CHECKING:
    from .model import Model

__all__ = ["CaptureError", "CapturedTrainStep", "TrainStep", "capture_failed", "make_train_step"]

logger = logging.getLogger(__name__)
_WARMUP_STEPS = 3
_GRAPH_SAFE_OPTIMIZERS = (torch.optim.SGD,)  # graph-safe without a 'capturable' flag


class CaptureError(RuntimeError):
    """``compile(jit_compile=True)`` asked for a captured step and capture failed."""


def capture_failed(model: Model, error: BaseException) -> None:
    """Decide what a failed capture means: an error under ``jit_compile=True``, else a warning."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if model.jit_compile is True:
        raise CaptureError(f"compile(jit_compile=True) requires the train step to be captured as a "
                           f"CUDA graph, but capture failed ({reason}). Remove host syncs such as "
                           ".item() or data-dependent control flow from forward, or compile with "
                           "jit_compile='auto' (falls back to eager) or False.") from error
    logger.warning("fit: cannot capture the train step as a CUDA graph (%s); training eagerly. "
                   "compile(jit_compile=False) silences this.", reason)


class TrainStep:
    """Eager training step. ``metrics[0]`` is the loss mean; sums live in one device tensor."""

    def __init__(self, model: Model, module: nn.Module, strategy: Strategy, metrics: list[Metric]):
        self.model, self.module, self.strategy, self.metrics = model, module, strategy, metrics
        self.sums = torch.zeros(len(metrics), 2, dtype=torch.float64, device=strategy.device)
        self.checked = False
        self.grads_to_none = True  # cheaper eagerly; a captured graph needs its grads to stay put
        self.scaler = model.precision.grad_scaler(strategy.device)

    def begin_epoch(self) -> None:
        """Zero the sums; each metric's state becomes a live view of its row."""
        self.sums.zero_()
        for metric, row in zip(self.metrics, self.sums):
            metric.set_state(row)

    def end(self) -> None:
        """Undo anything the step changed for its own sake (see `CapturedTrainStep`)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, global_size: int) -> None:
        rows = batch_rows(y)
        if rows == 0:  # this replica's part of a tiny global batch is empty: join DDP anyway
            (sum(t.sum() for t in pytree.tree_leaves(call_model(self.module, x))) * 0).backward()
            self._apply()
            return
        replicas = self.strategy.num_replicas_in_sync
        self._step(x, y, rows * replicas / global_size)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward pass; the first one also explains bad inputs and labels."""
        if self.checked:
            return call_model(self.module, x)
        try:
            pred = call_model(self.module, x)
        except (RuntimeError, TypeError) as error:
            shown = (describe_tensor(x) if isinstance(x, torch.Tensor)
                     else pytree.tree_map(describe_tensor, x))
            raise ValueError(
                f"The model failed on the first batch of inputs, {shown}: "
                f"{error}. Check that the dataset's map gives the dtype and shape the first layer "
                "expects (e.g. float32 [batch, 1, 28, 28] for nn.Conv2d(1, ...))."
            ) from error
        self.model.compiled_loss.check(pred, y)
        self.checked = True
        return pred

    def _step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
        with self.model.precision.autocast(self.strategy.device):
            pred = self._forward(x, y)
            loss = self.model.compiled_loss(pred, y)
        # Each replica's mean loss, scaled so DDP's average is the global-batch mean.
        scaled = loss * scale if scale != 1 else loss
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        self._apply()
        pred = pytree.tree_map(torch.Tensor.detach, pred)
        count = torch.full((), batch_rows(y), dtype=torch.float64, device=self.strategy.device)
        rows = [torch.stack([loss.detach().double() * count, count])]
        for metric in self.metrics[1:]:
            total, n = metric.contribution(pred, y)
            rows.append(torch.stack([total.double(), torch.full_like(count, n)]))
        self.sums.add_(torch.stack(rows))

    def _apply(self) -> None:
        if self.scaler:
            self.scaler.step(self.model.optimizer)
            self.scaler.update()
        else:
            self.model.optimizer.step()
        self.model.optimizer.zero_grad(set_to_none=self.grads_to_none)


class CapturedTrainStep(TrainStep):
    """The same step, captured as a CUDA graph after a few eager warm-up steps; ``replays``
    counts the steps run from the graph."""

    capture_error_mode = "global"  # torch.cuda.graph's: which threads' CUDA calls may break the capture

    def __init__(self, model: Model, module: nn.Module, strategy: Strategy, metrics: list[Metric]):
        super().__init__(model, module, strategy, metrics)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self.failed = False
        self.warmed = 0
        self.grads_to_none = False
        self._capturable = [group.get("capturable") for group in model.optimizer.param_groups]
        for group in model.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
        self._move_steps(strategy.device)
        self._side = torch.cuda.Stream(strategy.device)

    def _move_steps(self, device: torch.device) -> None:
        for state in self.model.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device)

    def end(self) -> None:
        """Leave the optimizer as the plain path keeps it (so artifacts never say 'capturable'),
        and release the graph: its memory pool, and the NCCL kernels of a replica step, which
        keep the process group from being destroyed at exit while they live (pytorch#115388)."""
        torch.cuda.synchronize(self.strategy.device)
        if self.graph is not None:
            self.graph.reset()
            self.graph = self.static_x = self.static_y = None
        for group, flag in zip(self.model.optimizer.param_groups, self._capturable):
            if flag is not None:
                group["capturable"] = flag
        if not any(self._capturable):
            self._move_steps(torch.device("cpu"))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, global_size: int) -> None:
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):  # structures: eager
            super().__call__(x, y, global_size)
        elif self.graph is not None and x.shape == self.static_x.shape:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            self.replays += 1
        elif self.failed or self.graph is not None or len(y) == 0:
            super().__call__(x, y, global_size)
        elif self.warmed < _WARMUP_STEPS:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self._step(x, y, 1.0)
            torch.cuda.current_stream().wait_stream(self._side)
            self.warmed += 1
        else:
            self._capture(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
                self._step(self.static_x, self.static_y, 1.0)
        except Exception as error:  # "auto": train eagerly instead; True: raise
            self.failed = True
            torch.cuda.synchronize(self.strategy.device)
            capture_failed(self.model, error)
            self._step(x, y, 1.0)
            return
        self.graph = graph
        graph.replay()
        self.replays += 1


def _is_sharded(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded unless it was imported
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def make_train_step(model: Model, module: nn.Module, strategy: Strategy, metrics: list[Metric]) -> TrainStep:
    """The captured step where it is safe and wanted, the CPU step on a CPU, else the eager one."""
    mode = model.jit_compile
    reasons = []
    if strategy.device.type != "cuda":
        reasons.append("the model is not on a CUDA device")
    replicas = strategy.num_replicas_in_sync > 1 and strategy.device.type == "cuda"
    if replicas:  # one flat gradient bucket, all-reduced inside the graph
        from .replica_capture import CapturedReplicaStep, replica_capture_blocker

        if (blocker := replica_capture_blocker(model, strategy)) is not None:
            reasons.append(blocker)
        elif mode == "auto":  # a run on 4 GPUs did not finish: no default until that is fixed
            reasons.append("a captured step over several GPUs is opt-in for now: compile(jit_compile=True)")
    elif strategy.num_replicas_in_sync > 1:
        reasons.append("several replicas average gradients between steps")
    if _is_sharded(module):
        reasons.append("the parameters are sharded (FSDP2 gathers them around every block)")
    optimizer = model.optimizer
    if model.precision.dtype is torch.float16:
        reasons.append("16-mixed precision scales the loss with host-side checks")
    if "capturable" not in optimizer.defaults and not isinstance(optimizer, _GRAPH_SAFE_OPTIMIZERS):
        reasons.append(f"{type(optimizer).__name__} has no 'capturable' mode")
    if mode is True and reasons:
        raise ValueError("compile(jit_compile=True) needs a CUDA-graph-safe setup, but "
                         + "; ".join(reasons) + ". Use jit_compile='auto' or False.")
    if mode is not False and strategy.device.type == "cpu":
        from .cpu_step import CpuTrainStep  # it builds on TrainStep, defined here

        return CpuTrainStep(model, module, strategy, metrics)
    if mode is False or reasons:
        if replicas and reasons and mode == "auto":
            logger.warning("fit: training %d replicas with eager DDP, not a captured step: %s.",
                           strategy.num_replicas_in_sync, "; ".join(reasons))
        return TrainStep(model, module, strategy, metrics)
    if replicas:
        return CapturedReplicaStep(model, module, strategy, metrics)
    return CapturedTrainStep(model, module, strategy, metrics)
