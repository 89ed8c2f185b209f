"""Callbacks for ``fit``, named as in Keras: checkpoints, backups, schedules, loggers, stops."""

from ..training.callbacks import Callback, History, ProgressBar
from ..training.interrupts import TrainingPreempted
from .backup import BackupAndRestore

__all__ = ["BackupAndRestore", "Callback", "History", "ProgressBar", "TrainingPreempted"]
