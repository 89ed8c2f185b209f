"""distsave: train under a distribution strategy, save once, load anywhere."""

from . import callbacks, data, layers, saved_model, strategies, utils
from .data import datasets
from .saving import ArtifactError, SaveError, load_model, register_serializable, wait_for_saves
from .saving.checkpoint_manager import CheckpointManager
from .strategies import (
    MirroredStrategy,
    MultiWorkerMirroredStrategy,
    OneDeviceStrategy,
    ReduceOp,
    ShardedStrategy,
    Strategy,
    get_strategy,
)
from .training import Callback, History, Model, Sequential, TensorSpec, losses, metrics

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "Callback", "CheckpointManager", "History", "MirroredStrategy", "Model",
    "MultiWorkerMirroredStrategy", "OneDeviceStrategy", "ReduceOp", "SaveError", "Sequential",
    "ShardedStrategy", "Strategy", "TensorSpec", "__version__", "callbacks", "data", "datasets",
    "get_strategy", "layers", "load_model", "losses", "metrics", "register_serializable",
    "saved_model", "strategies", "utils", "wait_for_saves",
]
