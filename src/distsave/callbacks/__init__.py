"""Callbacks for ``fit``, named as in Keras: checkpoints, backups, schedules, loggers, stops."""

from ..training.callbacks import Callback, History, ProgressBar
from ..training.interrupts import TrainingPreempted
from .backup import BackupAndRestore
from .csv_logger import CSVLogger
from .early_stopping import EarlyStopping
from .learning_rate import LearningRateScheduler, ReduceLROnPlateau
from .model_checkpoint import ModelCheckpoint
from .tensorboard import TensorBoard
from .terminate_on_nan import TerminateOnNaN

__all__ = ["BackupAndRestore", "CSVLogger", "Callback", "EarlyStopping", "History",
           "LearningRateScheduler", "ModelCheckpoint", "ProgressBar", "ReduceLROnPlateau",
           "TensorBoard", "TerminateOnNaN", "TrainingPreempted"]
