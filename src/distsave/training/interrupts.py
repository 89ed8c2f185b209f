"""Stopping a fit between steps: ``model.stop_training`` and SIGTERM, agreed by every replica.

Schedulers (Slurm, Kubernetes, torchrun) announce preemption with SIGTERM and kill a little
later. While `fit` runs, SIGTERM only raises a flag; after each step every replica learns
whether any replica was signalled or asked to stop (one tiny all-reduce when there are several
replicas), so all leave the loop at the same step and none waits forever in a collective.
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
        flags = torch.tensor([float(self.signalled), float(stop_training)], device=self.strategy.device)
        preempted, stop = (self.strategy.all_reduce_sum(flags) > 0).tolist()
        return preempted, stop
