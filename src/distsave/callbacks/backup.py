"""`BackupAndRestore`: a killed or preempted ``fit`` continues exactly where it stopped."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from ..saving.checkpoint_manager import CheckpointManager
from ..saving.errors import ArtifactError
from ..training.callbacks import Callback
from ..training.resume_state import (TrainingState, capture_training_state, epoch_data_state,
                                     restore_data_state, restore_replica_state, skip_trained)

__all__ = ["BackupAndRestore"]

logger = logging.getLogger(__name__)


def check_save_freq(save_freq: Any, owner: str) -> str | int:
    if save_freq == "epoch" or (isinstance(save_freq, int) and not isinstance(save_freq, bool)
                                and save_freq >= 1):
        return save_freq
    raise ValueError(f"{owner}: expected save_freq='epoch' or a number of steps >= 1. "
                     f"Received: save_freq={save_freq!r}.")


class BackupAndRestore(Callback):
    """Back the fit up regularly; a restarted ``fit`` with this callback resumes from the backup.

    The backup holds the weights, the optimizer state and where the fit stood: epoch, batch
    within the epoch, every replica's RNGs (torch CPU/CUDA, NumPy, Python), the epoch's data
    order and the metric sums. Restarted with the same program and the same ``fit(epochs=...)``,
    training continues mid-epoch and ends with the weights an uninterrupted run gives, bitwise
    (same replica count and devices; deterministic ``map`` functions). A SIGTERM stops ``fit``
    after the current step with a backup of that step.

    Args:
        backup_dir: A folder for the backup, used by this run only (on a file system every
            replica sees).
        save_freq: ``"epoch"`` backs up at each epoch's end; an integer every that many steps.
        delete_checkpoint: Remove the backup when ``fit`` completes.

    Example:
        >>> model.fit(train, epochs=10, callbacks=[distsave.callbacks.BackupAndRestore("backup")])
    """

    def __init__(self, backup_dir: str | os.PathLike, save_freq: str | int = "epoch",
                 delete_checkpoint: bool = True):
        self.save_freq = check_save_freq(save_freq, "BackupAndRestore")
        self.delete_checkpoint = delete_checkpoint
        self.manager = CheckpointManager(backup_dir, max_to_keep=1, checkpoint_name="backup")
        self._pending: TrainingState | None = None
        self._hyperparameters: list[dict[str, Any]] = []
        self._epoch_data: dict[str, Any] = {}
        self._epoch = 0
        self._last_step: int | None = None

    def on_train_begin(self, logs=None):
        self._pending, self._last_step = None, None
        checkpoint = self.manager.latest
        if checkpoint is None:
            return
        if checkpoint.training_state is None:
            raise ArtifactError(f"'{checkpoint.path}' has no training state, so BackupAndRestore cannot "
                                "resume from it. Give BackupAndRestore a folder of its own.")
        state = self.manager.restore_training_state(checkpoint.step)
        self.manager.restore(self.model, checkpoint.step)
        self.model.epoch, self.model.step = state.epoch, state.step
        self._last_step = state.step
        strategy = self.model.distribute_strategy
        if strategy.is_chief:
            logger.warning("BackupAndRestore: resuming from '%s': step %d (epoch %d, after %d batch(es)).",
                           checkpoint.path, state.step, state.epoch + 1, state.batch)
        if state.batch == 0:
            restore_data_state(self.params["data"], state)
            restore_replica_state(state, strategy, None)
            return
        self._pending = state
        self._hyperparameters = [{k: v for k, v in g.items() if k != "params"}
                                 for g in self.model.optimizer.param_groups]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._pending is None:
            self._epoch_data = epoch_data_state(self.params["data"])
        else:
            self._epoch_data = {k: self._pending.resume[k] for k in ("epoch_random", "shuffle_passes")}

    def on_epoch_batches(self, epoch: int, batches: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        state, self._pending = self._pending, None
        if state is None:
            return batches
        # The epoch already began in the run that was stopped: undo what on_epoch_begin callbacks
        # (a learning-rate schedule) just did again, then replay its data order up to where it stood.
        for group, saved in zip(self.model.optimizer.param_groups, self._hyperparameters):
            group.update(saved)
        restore_data_state(self.params["data"], state)
        return skip_trained(batches, state, self.model.distribute_strategy, self.params["metrics"])

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq != "epoch" and self.model.step % self.save_freq == 0:
            self._backup(self._epoch, batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._backup(epoch + 1, 0)

    def on_preempted(self, epoch: int, batch: int) -> str | None:
        if self._last_step != self.model.step:
            self._backup(epoch, batch)
        return (f"Its state is backed up in '{self.manager.directory}': run the same program again "
                "to resume from there.")

    def on_train_end(self, logs=None):
        strategy = self.model.distribute_strategy
        if self.delete_checkpoint:
            if strategy.is_chief:
                self.manager.clear()
            strategy.barrier()

    def _backup(self, epoch: int, batch: int) -> None:
        data_state = self._epoch_data if batch else epoch_data_state(self.params["data"])
        state = capture_training_state(self.model.distribute_strategy, epoch=epoch, batch=batch,
                                       step=self.model.step, metrics=self.params["metrics"],
                                       data_state=data_state)
        self.manager.save(self.model, training_state=state)
        self._last_step = self.model.step
