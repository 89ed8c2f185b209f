"""`ModelCheckpoint`: save the model (or its weights) during ``fit``, every epoch or the best."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..training.callbacks import Callback, read_logs
from ..training.weights import save_weights
from .backup import check_save_freq
from .monitor import Monitor

__all__ = ["ModelCheckpoint"]

logger = logging.getLogger(__name__)


class ModelCheckpoint(Callback):
    """Save the model at a path formatted from the epoch, step and logged values.

    Args:
        filepath: A path template: ``{epoch}`` (1-based, as Keras), ``{step}`` and any logged
            name, with format specs: ``"ckpt/model-{epoch:02d}-{val_loss:.4f}"``. A distsave
            model directory, or with ``save_weights_only`` a ``.safetensors`` file.
        monitor: The logged value ``save_best_only`` compares.
        verbose: 1 logs each save.
        save_best_only: Save only when ``monitor`` improved on the best seen so far.
        save_weights_only: Write the weights alone as one safetensors file (no architecture,
            optimizer or program), e.g. for ``model.load_state_dict``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy-like names).
        save_freq: ``"epoch"``, or every that many steps (then the logs are the running
            epoch's values on the chief replica).
        initial_value_threshold: With ``save_best_only``, the value to beat first.
        blocking: False writes in the background (`model.save(blocking=False)`); the tensors
            are copied first, so training goes on at once.

    Every replica calls `model.save`; the chief writes once. The decision to save is the
    chief's, shared with the others, so replicas never disagree and wait for each other.

    Example:
        >>> ModelCheckpoint("best", monitor="val_accuracy", save_best_only=True)
    """

    def __init__(self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str | int = "epoch", initial_value_threshold: float | None = None,
                 blocking: bool = True):
        self.filepath = os.fspath(filepath)
        if save_weights_only and not self.filepath.endswith(".safetensors"):
            raise ValueError("ModelCheckpoint(save_weights_only=True) writes one safetensors file: "
                             f"expected a filepath ending in '.safetensors'. Received: {self.filepath!r}.")
        self.monitor = Monitor(monitor, mode, owner="ModelCheckpoint")
        self.verbose, self.save_best_only, self.save_weights_only = verbose, save_best_only, save_weights_only
        self.save_freq = check_save_freq(save_freq, "ModelCheckpoint")
        self.best = initial_value_threshold
        self.blocking = blocking
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq != "epoch" and self.model.step % self.save_freq == 0:
            self._maybe_save(self._epoch, read_logs(dict(logs or {})))

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._maybe_save(epoch, dict(logs or {}))

    def _decide(self, epoch: int, logs: dict[str, Any]) -> str | None:
        """The chief's decision: the path to save to, or None."""
        if self.save_best_only:
            current = self.monitor.read(logs)
            if current is None or not self.monitor.improved(current, self.best):
                return None
            if self.verbose:
                logger.warning("ModelCheckpoint: %s improved from %s to %.5f.", self.monitor.name, self.best, current)
            self.best = current
        try:
            return self.filepath.format(epoch=epoch + 1, step=self.model.step, **logs)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"ModelCheckpoint: cannot format filepath {self.filepath!r} ({error!r}). "
                             f"Available names: epoch, step, {', '.join(sorted(logs))}.") from None

    def _maybe_save(self, epoch: int, logs: dict[str, Any]) -> None:
        strategy = self.model.distribute_strategy
        path = strategy.broadcast_object(self._decide(epoch, logs) if strategy.is_chief else None)
        if path is None:
            return
        if self.verbose and strategy.is_chief:
            logger.warning("ModelCheckpoint: saving to %s.", path)
        if self.save_weights_only:
            save_weights(self.model, path)
        else:
            self.model.save(path, blocking=self.blocking)
