"""Learning-rate callbacks: a schedule per epoch, and a cut when progress stalls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..training.callbacks import Callback
from .monitor import Monitor

__all__ = ["LearningRateScheduler", "ReduceLROnPlateau", "learning_rate", "set_learning_rate"]

logger = logging.getLogger(__name__)


def learning_rate(model: Any) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(model.optimizer.param_groups[0]["lr"])


def set_learning_rate(model: Any, lr: float) -> None:
    """Set every parameter group's learning rate (a plain float: the step reads it each time)."""
    for group in model.optimizer.param_groups:
        group["lr"] = float(lr)


class LearningRateScheduler(Callback):
    """Set the learning rate at each epoch's start to ``schedule(epoch, lr)`` (0-based epoch).

    Example:
        >>> LearningRateScheduler(lambda epoch, lr: lr if epoch < 10 else lr * 0.9)
    """

    def __init__(self, schedule: Callable[[int, float], float], verbose: int = 0):
        if not callable(schedule):
            raise TypeError(f"Expected schedule(epoch, lr) -> lr, a callable. Received: {schedule!r}.")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = self.schedule(epoch, learning_rate(self.model))
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr != lr:
            raise ValueError(f"LearningRateScheduler: schedule({epoch}, lr) returned {lr!r}; expected a "
                             "float learning rate.")
        set_learning_rate(self.model, lr)
        if self.verbose and self.model.distribute_strategy.is_chief:
            logger.warning("Epoch %d: LearningRateScheduler sets the learning rate to %s.", epoch + 1, lr)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = learning_rate(self.model)


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` once ``monitor`` stalls for ``patience`` epochs.

    Args:
        monitor: The logged value to watch.
        factor: The multiplier, below 1.
        patience: Epochs without improvement before a cut.
        verbose: 1 logs each cut.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        min_delta: A change smaller than this is no improvement.
        cooldown: Epochs to wait after a cut before counting again.
        min_lr: The learning rate never goes below this.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 verbose: int = 0, mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0):
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: expected 0 < factor < 1. Received: factor={factor}.")
        self.monitor = Monitor(monitor, mode, min_delta, owner="ReduceLROnPlateau")
        self.factor, self.patience, self.verbose = factor, patience, verbose
        self.cooldown, self.min_lr = cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.wait, self.cooldown_counter = 0, 0
        self.best: float | None = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = learning_rate(self.model)
        current = self.monitor.read(logs)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.monitor.improved(current, self.best):
            self.best, self.wait = current, 0
            return
        if self.cooldown_counter > 0:
            return
        self.wait += 1
        old = learning_rate(self.model)
        if self.wait >= self.patience and old > self.min_lr:
            new = max(old * self.factor, self.min_lr)
            set_learning_rate(self.model, new)
            self.cooldown_counter, self.wait = self.cooldown, 0
            if self.verbose and self.model.distribute_strategy.is_chief:
                logger.warning("Epoch %d: ReduceLROnPlateau cuts the learning rate to %s.", epoch + 1, new)
