"""The CPU train step: the eager step with what a profile of it on a CPU says pays.

Profiled on the workflow CNN at batch 64 (2 cores), the eager step spent about 37% of its time
in ``max_pool2d_with_indices`` (PyTorch's NCHW CPU kernel is a scalar loop) and about 14% in
Adam's dozen small ops per parameter. This step runs the forward pass under `FastPooling`
(the same values, indices and gradients from the vectorised channels-last kernel), runs the
convolution -> ReLU -> max-pool blocks of Sequentials channels-last with the ReLU after pooling
(`channels_last_blocks`), and switches optimizers that have a fused CPU kernel to it for the
length of ``fit``. Results equal the plain step's within float32 rounding. ``compile(jit_compile=False)`` turns it off.

Threads: on a machine whose cores other work also uses, OpenMP threads that spin-wait for a
busy sibling core can make a step several times slower than one thread. Unless
``OMP_NUM_THREADS`` is set, the step times steps with the process's thread count and with one
thread, alternating, keeps the faster, and chooses again every 500 steps as other work comes
and goes (the process's count is restored after ``fit``).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..strategies import Strategy
from .cpu_blocks import channels_last_blocks
from .fast_pool import FastPooling
from .metrics import Metric
from .steps import TrainStep

if TYPE_CHECKING:
    from .model import Model

__all__ = ["CpuTrainStep", "fast_cpu_inference"]

logger = logging.getLogger(__name__)
_WARMUP, _TIMED = 5, 7  # steps before timing, and timed steps per thread count
_RECHECK = 500  # steps after a choice before choosing again

# torch.optim classes with a fused CPU kernel (torch >= 2.4); others keep their own path.
_FUSED_ON_CPU = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _fusable(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Fuse only what the user left to torch: ``fused`` and ``foreach`` unset, plain floats."""
    return (type(optimizer) in _FUSED_ON_CPU and group.get("fused") is None
            and not group.get("foreach") and not group.get("differentiable")
            and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                           torch.float16) for p in group["params"]))


def _say_if_replicas_share_cores(strategy: Strategy) -> None:
    """Several CPU replicas on one machine split its cores; with under two each, one replica
    (which uses them all) usually trains faster. Say so once, from the chief."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", strategy.num_replicas_in_sync))
    cores = os.cpu_count() or 1
    if local > 1 and cores < 2 * local and strategy.is_chief:
        logger.warning("fit: %d CPU replicas share this machine's %d cores (%d thread(s) each); "
                       "they average gradients as more machines would, but on one machine a single "
                       "replica is usually faster.", local, cores, torch.get_num_threads())


class _ThreadChoice:
    """Time steps at each candidate thread count, alternating (so a burst of other work hits
    both alike), and keep the fastest."""

    def __init__(self) -> None:
        self.original = torch.get_num_threads()
        self.tune = self.original > 1 and "OMP_NUM_THREADS" not in os.environ
        self.steps = 0
        self._start_choosing()

    def _start_choosing(self) -> None:
        self.candidates = [self.original, 1] if self.tune else []
        self.seconds: dict[int, list[float]] = {n: [] for n in self.candidates}
        self.first = self.steps + _WARMUP  # the step after which timing starts

    @property
    def choosing(self) -> bool:
        return bool(self.candidates)

    def run(self, step) -> None:
        """Run ``step()``; while choosing, time it at the next candidate."""
        self.steps += 1
        if self.tune and not self.candidates and self.steps > self.first + _RECHECK:
            self._start_choosing()  # other work on the machine comes and goes: choose again
        if not self.candidates or self.steps <= self.first:
            step()
            return
        threads = self.candidates[(self.steps - self.first - 1) % len(self.candidates)]
        torch.set_num_threads(threads)
        start = time.perf_counter()
        step()
        self.seconds[threads].append(time.perf_counter() - start)
        if all(len(times) == _TIMED for times in self.seconds.values()):
            self._choose()

    def _choose(self) -> None:
        medians = {n: statistics.median(times) for n, times in self.seconds.items()}
        best = min(medians, key=medians.get)
        torch.set_num_threads(best)
        self.candidates = []
        self.first = self.steps
        logger.info("fit: %d CPU thread(s) per step (median step %s)", best,
                    ", ".join(f"{1000 * t:.1f} ms at {n}" for n, t in medians.items()))

    def restore(self) -> None:
        torch.set_num_threads(self.original)


class CpuTrainStep(TrainStep):
    """`TrainStep` with fast pooling in the forward pass and a fused optimizer during ``fit``."""

    def __init__(self, model: Model, module: nn.Module, strategy: Strategy, metrics: list[Metric]):
        super().__init__(model, module, strategy, metrics)
        self._fused_groups = [group for group in model.optimizer.param_groups
                              if _fusable(model.optimizer, group)]
        for group in self._fused_groups:
            group["fused"] = True
        _say_if_replicas_share_cores(strategy)
        self.threads = _ThreadChoice()
        self._blocks = ExitStack()
        self._blocks.enter_context(channels_last_blocks(module))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, global_size: int) -> None:
        self.threads.run(lambda: super(CpuTrainStep, self).__call__(x, y, global_size))

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with FastPooling():
            return super()._forward(x, y)

    def end(self) -> None:
        """Give the optimizer back as compiled, so a saved artifact never records 'fused'."""
        for group in self._fused_groups:
            group["fused"] = None
        self.threads.restore()
        self._blocks.close()


def fast_cpu_inference(model: Model, device: torch.device) -> AbstractContextManager:
    """Where ``evaluate`` and ``predict`` run their forward passes: on a CPU (unless compiled
    with ``jit_compile=False``) under `FastPooling` with `channels_last_blocks`, else as they are."""
    if device.type != "cpu" or model.jit_compile is False:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(channels_last_blocks(model))
    stack.enter_context(FastPooling())
    return stack
