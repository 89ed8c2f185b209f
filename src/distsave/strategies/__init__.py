"""Distribution strategies: where replicas run and how they agree."""

from .base import DistributedDataset, ReduceOp, Strategy, get_strategy, has_strategy
from .devices import parse_device
from .mirrored import MirroredStrategy, MultiWorkerMirroredStrategy
from .one_device import OneDeviceStrategy

__all__ = ["DistributedDataset", "MirroredStrategy", "MultiWorkerMirroredStrategy",
           "OneDeviceStrategy", "ReduceOp", "ShardedStrategy", "Strategy", "get_strategy",
           "has_strategy", "parse_device"]


def __getattr__(name: str):
    if name == "ShardedStrategy":  # FSDP2 and DTensor load only for those who use them
        from .sharded import ShardedStrategy

        return ShardedStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
