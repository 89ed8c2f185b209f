"""Stopping a fit between steps: ``model.stop_training`` and SIGTERM, agreed by every replica.

Schedulers (Slurm, Kubernetes, torchrun) announce preemption with SIGTERM and kill a little
later. While `fit` runs, SIGTERM only raises a flag; after each step every replica learns
whether any replica was signalled or asked to stop (one tiny all-reduce when there are several
replicas), so all leave the loop at the same step and none waits forever in a collective.
On GPUs that all-reduce is read one step late, from pinned memory, so the host never waits
for the step it has just queued (a wait per step would leave the GPUs idle while Python
queues the next one); the replicas still agree, one step later.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from ..strategies import Strategy

__all__ = ["PREEMPTED_EXIT_CODE", "Interrupts", "TrainingPreempted"]

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


class TrainingPreempted(SystemExit):
    """``fit`` stopped on SIGTERM after finishing a step (and writing a backup, if any).

    A `SystemExit`, so an unhandled one ends the program with code 143 and its message.
    """

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Interrupts:
    """Catch SIGTERM from construction to `close` (main thread only); agree on stopping after each step."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.signalled = False
        self._previous: Any = None
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def close(self) -> None:
        """Put the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def deliver_pending(self) -> None:
        """A SIGTERM that came too late to stop the fit (it had finished) is delivered now."""
        if self.signalled:
            signal.raise_signal(signal.SIGTERM)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def agree(self, stop_training: bool) -> tuple[bool, bool]:
        """``(preempted, stop)`` as agreed by all replicas: true if true on any of them."""
        if self.strategy.num_replicas_in_sync == 1:
            return self.signalled, stop_training
        if self.strategy.device.type == "cuda":
            return self._agree_a_step_late(stop_training)
        flags = torch.tensor([float(self.signalled), float(stop_training)], device=self.strategy.device)
        preempted, stop = (self.strategy.all_reduce_sum(flags) > 0).tolist()
        return preempted, stop

    def _agree_a_step_late(self, stop_training: bool) -> tuple[bool, bool]:
        flags = torch.empty(2, device=self.strategy.device)
        flags[0], flags[1] = float(self.signalled), float(stop_training)  # fills: no host sync
        reduced = torch.empty(2, pin_memory=True)
        reduced.copy_(self.strategy.all_reduce_sum(flags), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self._pending = self._pending, (reduced, done)
        if previous is None:
            return False, False
        previous[1].synchronize()
        preempted, stop = (previous[0] > 0).tolist()
        return preempted, stop
