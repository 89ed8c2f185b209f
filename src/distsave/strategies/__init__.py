"""Distribution strategies: where replicas run and how they agree."""

from .base import DistributedDataset, ReduceOp, Strategy, get_strategy, has_strategy
from .devices import parse_device
from .mirrored import MirroredStrategy, MultiWorkerMirroredStrategy
from .one_device import OneDeviceStrategy
from .sharded import ShardedStrategy

__all__ = ["DistributedDataset", "MirroredStrategy", "MultiWorkerMirroredStrategy",
           "OneDeviceStrategy", "ReduceOp", "ShardedStrategy", "Strategy", "get_strategy",
           "has_strategy", "parse_device"]
