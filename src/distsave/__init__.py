"""distsave: train under a distribution strategy, save once, load anywhere."""

from . import data, layers, saved_model, strategies
from .data import datasets
from .saving import ArtifactError, SaveError, load_model, register_serializable
from .strategies import MirroredStrategy, OneDeviceStrategy, ReduceOp, Strategy, get_strategy
from .training import Callback, History, Model, Sequential, TensorSpec, losses, metrics

__version__ = "0.1.0"

__all__ = ["ArtifactError", "SaveError", "load_model", "register_serializable", "saved_model", "Callback", "History", "MirroredStrategy", "Model", "OneDeviceStrategy", "ReduceOp",
           "Sequential", "Strategy", "TensorSpec", "__version__", "data", "datasets", "get_strategy",
           "layers", "losses", "metrics", "strategies"]
