"""`EarlyStopping`: stop ``fit`` when a monitored value stops improving."""

from __future__ import annotations

import logging

import torch

from ..training.callbacks import Callback
from .monitor import Monitor

__all__ = ["EarlyStopping"]

logger = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Stop training once ``monitor`` has not improved for ``patience`` epochs (Keras semantics).

    Args:
        monitor: The logged value to watch.
        min_delta: A change smaller than this is no improvement.
        patience: Epochs without improvement before stopping.
        verbose: 1 logs when it stops and when it restores weights.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        baseline: Training stops unless the value beats this within ``patience`` epochs.
        restore_best_weights: At the end of training, put back the weights of the best epoch.
        start_from_epoch: Epochs to wait before watching at all (warm-up).

    Example:
        >>> EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 verbose: int = 0, mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, start_from_epoch: int = 0):
        self.monitor = Monitor(monitor, mode, min_delta, owner="EarlyStopping")
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def _keep_weights(self) -> None:
        self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def on_epoch_end(self, epoch, logs=None):
        current = self.monitor.read(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self._keep_weights()
            self.best_epoch = epoch
        self.wait += 1
        if self.monitor.improved(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self._keep_weights()
            if self.baseline is None or self.monitor.improved(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        chief = self.model.distribute_strategy.is_chief
        if self.stopped_epoch and self.verbose and chief:
            logger.warning("EarlyStopping: stopped after epoch %d.", self.stopped_epoch + 1)
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose and chief:
                logger.warning("EarlyStopping: restoring the weights of epoch %d.", self.best_epoch + 1)
            self.model.load_state_dict(self.best_weights)
