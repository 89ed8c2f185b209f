"""`TensorBoard`: epoch (and optionally step) scalars as TensorBoard event files."""

from __future__ import annotations

import os
from typing import Any

from ..training.callbacks import Callback, read_logs

__all__ = ["TensorBoard"]


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("distsave.callbacks.TensorBoard needs the 'tensorboard' package: install "
                          "it with pip install 'distsave[tensorboard]'.") from error
    return SummaryWriter


class TensorBoard(Callback):
    """Write logged values as TensorBoard scalars, as Keras lays them out.

    ``log_dir/train`` holds ``epoch_loss``, ``epoch_accuracy``, ...; ``log_dir/validation``
    holds the ``val_`` values under the same tags, so TensorBoard draws them on one chart.
    Only the chief replica writes.

    Args:
        log_dir: The folder for event files.
        update_freq: ``"epoch"``, or every that many steps also ``batch_loss`` etc. (each read
            costs a device sync).

    Raises:
        ImportError: the ``tensorboard`` extra is not installed (the message says how).
    """

    def __init__(self, log_dir: str | os.PathLike = "logs", update_freq: str | int = "epoch"):
        self.SummaryWriter = _summary_writer()
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(f"TensorBoard: expected update_freq='epoch' or a number of steps >= 1. "
                             f"Received: {update_freq!r}.")
        self.log_dir, self.update_freq = os.fspath(log_dir), update_freq
        self._writers: dict[str, Any] = {}

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            self._writers[name] = self.SummaryWriter(os.path.join(self.log_dir, name))
        return self._writers[name]

    def on_train_batch_end(self, batch, logs=None):
        if (self.update_freq == "epoch" or not self.model.distribute_strategy.is_chief
                or self.model.step % self.update_freq):
            return
        for key, value in read_logs(dict(logs or {})).items():
            self._writer("train").add_scalar(f"batch_{key}", float(value), self.model.step)

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.distribute_strategy.is_chief:
            return
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            self._writer(split).add_scalar(f"epoch_{name}", float(value), epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
