"""distsave: train under a distribution strategy, save once, load anywhere."""

import os as _os
import sys as _sys

# OpenMP threads that spin while they wait make every torch op on a CPU several times slower
# when other processes use the cores too (measured on a shared 2-core machine: a batch-64
# forward pass of the workflow CNN 72 ms spinning, 8 ms passive; `distsave demo` 96 s vs 65 s).
# The OpenMP runtime reads this once, when torch loads: so only where distsave comes first
# (the `distsave` command, scripts that import it before torch), and never over a user's choice.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import callbacks, data, layers, saved_model, strategies, utils
from .data import datasets
from .saving import ArtifactError, SaveError, load_model, register_serializable, wait_for_saves
from .saving.checkpoint_manager import CheckpointManager
from .strategies import (
    MirroredStrategy,
    MultiWorkerMirroredStrategy,
    OneDeviceStrategy,
    ReduceOp,
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


def __getattr__(name: str):
    if name == "ShardedStrategy":  # FSDP2 and DTensor load only for those who use them
        return strategies.ShardedStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
