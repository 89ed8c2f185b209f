"""Models with Keras' compile / fit / evaluate / predict, losses, metrics, optimizers, callbacks."""

from . import losses, metrics
from .callbacks import Callback, History, ProgressBar
from .model import Model, Sequential
from .specs import TensorSpec

__all__ = ["Callback", "History", "Model", "ProgressBar", "Sequential", "TensorSpec", "losses", "metrics"]
