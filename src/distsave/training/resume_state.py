"""Where a fit stands, beyond weights and optimizer: everything that decides how it continues.

A fit resumed from a backup continues bitwise like the uninterrupted run only if every source
of randomness and every running total comes back too: each replica's torch CPU/CUDA, NumPy and
Python RNG, the data order of the interrupted epoch (the Python RNG state that drew its shuffle
seed, and each ``shuffle`` node's pass counter), how many batches of that epoch were trained, and
each replica's metric sums. `TrainingState` holds all of it as JSON plus named tensors, so an
artifact can store it without pickle.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import seeds
from ..data.dataset import Dataset
from ..strategies import DistributedDataset, Strategy
from .metrics import Metric

__all__ = ["TrainingState", "capture_training_state", "epoch_data_state", "python_random_to_json",
           "restore_data_state", "restore_replica_state", "skip_trained"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """A resume point: ``resume`` is the JSON (see `format._validate_resume_state`), ``tensors``
    hold per-replica ``replica_{r}.torch_rng`` / ``.cuda_rng`` / ``.metric_sums``."""

    resume: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return self.resume["epoch"]

    @property
    def batch(self) -> int:
        """Batches of ``epoch`` already trained (0: the epoch starts afresh)."""
        return self.resume["batch"]

    @property
    def step(self) -> int:
        return self.resume["step"]


# -- RNG states as JSON ------------------------------------------------------------------------

def python_random_to_json(state: tuple) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _python_random_from_json(state: dict[str, Any]) -> tuple:
    return state["version"], tuple(state["internal"]), state["gauss_next"]


def _numpy_random_to_json() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _numpy_random_from_json(state: dict[str, Any]) -> tuple:
    return (state["bit_generator"], np.asarray(state["key"], dtype=np.uint32), state["pos"],
            state["has_gauss"], state["cached_gaussian"])


# -- data order --------------------------------------------------------------------------------

def _shuffles(data: Dataset | DistributedDataset) -> list[Any]:
    """The pipeline's ``shuffle`` nodes, outermost first (each keeps a pass counter)."""
    from ..data.dataset import _Shuffle

    node = data.dataset if isinstance(data, DistributedDataset) else data
    found = []
    while node is not None:
        if isinstance(node, _Shuffle):
            found.append(node)
        node = getattr(node, "_parent", None)
    return found


def epoch_data_state(data: Dataset | DistributedDataset) -> dict[str, Any]:
    """Taken as an epoch begins: what decides that epoch's data order (the generator that will
    draw the shuffle seed, `distsave.data.seeds`, and the shuffles' pass counters)."""
    return {"epoch_random": python_random_to_json(seeds.get_state()),
            "shuffle_passes": [node._passes for node in _shuffles(data)]}


def restore_data_state(data: Dataset | DistributedDataset, state: TrainingState) -> None:
    """Put back what `epoch_data_state` took, so the next pass yields the same batches."""
    nodes = _shuffles(data)
    passes = state.resume["shuffle_passes"]
    if len(nodes) != len(passes):
        raise ValueError(f"The backup was taken on a dataset with {len(passes)} shuffle step(s); this "
                         f"fit's dataset has {len(nodes)}. Resume with the same input pipeline.")
    for node, count in zip(nodes, passes):
        node._passes = count
    seeds.set_state(_python_random_from_json(state.resume["epoch_random"]))


# -- per-replica state -------------------------------------------------------------------------

def _replica_tensors(metrics: list[Metric], device: torch.device, fresh_epoch: bool) -> dict[str, torch.Tensor]:
    sums = torch.stack([m.state(device) for m in metrics]).detach().cpu().clone()
    tensors = {"torch_rng": torch.get_rng_state(), "metric_sums": sums.zero_() if fresh_epoch else sums}
    if device.type == "cuda":
        tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
    return tensors


def _gather_bytes(strategy: Strategy, data: torch.Tensor) -> list[torch.Tensor]:
    """Every replica's flat uint8 tensor (lengths may differ), on the CPU, in replica order."""
    if strategy.num_replicas_in_sync == 1:
        return [data]
    lengths = strategy.gather(torch.tensor([len(data)], device=strategy.device)).tolist()
    whole = strategy.gather(data.to(strategy.device)).cpu()
    return list(torch.split(whole, lengths))


def capture_training_state(strategy: Strategy, *, epoch: int, batch: int, step: int,
                           metrics: list[Metric], data_state: dict[str, Any]) -> TrainingState:
    """Every replica's RNGs and metric sums, gathered (a collective: call on every replica).

    Args:
        epoch, batch: The epoch and how many of its batches are trained.
        step: ``model.step``.
        metrics: The train step's metrics (loss first), whose sums are this epoch's so far.
        data_state: The chief's `epoch_data_state` of ``epoch``.
    """
    own_json = json.dumps({"python": python_random_to_json(random.getstate()),
                           "numpy": _numpy_random_to_json()}).encode()
    replicas = [json.loads(bytes(part.numpy()))
                for part in _gather_bytes(strategy, torch.frombuffer(bytearray(own_json), dtype=torch.uint8))]
    tensors = {}
    for name, tensor in _replica_tensors(metrics, strategy.device, batch == 0).items():
        flat = tensor.reshape(-1).view(torch.uint8)
        for r, part in enumerate(_gather_bytes(strategy, flat)):
            tensors[f"replica_{r}.{name}"] = part.view(tensor.dtype).reshape(tensor.shape).clone()
    resume = {"epoch": epoch, "batch": batch, "step": step,
              "num_replicas": strategy.num_replicas_in_sync,
              "metric_names": [m.name for m in metrics], **data_state, "replicas": replicas}
    return TrainingState(resume, tensors)


def restore_replica_state(state: TrainingState, strategy: Strategy, metrics: list[Metric] | None) -> None:
    """Give this replica its RNGs back, and its metric sums (into the epoch's zeroed sums) when
    ``metrics`` are given.

    With another replica count than the backup's, training continues but not bitwise as before:
    replica ``r`` takes the RNGs of replica ``r mod n`` and the chief takes all metric sums.
    """
    saved = state.resume["num_replicas"]
    rank, now = strategy.replica_id, strategy.num_replicas_in_sync
    if saved != now:
        logger.warning("Resuming a backup of %d replica(s) on %d: training continues, but not "
                       "bitwise as the uninterrupted run would.", saved, now)
    source = rank % saved
    if metrics is not None:
        _restore_sums(state, metrics, strategy)
    replica = state.resume["replicas"][source]
    random.setstate(_python_random_from_json(replica["python"]))
    np.random.set_state(_numpy_random_from_json(replica["numpy"]))
    torch.set_rng_state(state.tensors[f"replica_{source}.torch_rng"])
    cuda = state.tensors.get(f"replica_{source}.cuda_rng")
    if cuda is not None and strategy.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, strategy.device)


def _restore_sums(state: TrainingState, metrics: list[Metric], strategy: Strategy) -> None:
    names = [m.name for m in metrics]
    if names != state.resume["metric_names"]:
        raise ValueError(f"The backup tracks metrics {state.resume['metric_names']}; this fit tracks "
                         f"{names}. Resume with the same compile(metrics=...).")
    saved, rank = state.resume["num_replicas"], strategy.replica_id
    if saved == strategy.num_replicas_in_sync:
        sums = state.tensors[f"replica_{rank}.metric_sums"]
    else:  # the epoch's totals are summed over replicas at its end: the chief may hold them all
        sums = sum(state.tensors[f"replica_{r}.metric_sums"] for r in range(saved))
        sums = sums if rank == 0 else torch.zeros_like(sums)
    for metric, row in zip(metrics, sums):
        metric.state(strategy.device).copy_(row)


def skip_trained(batches: Iterator[Any], state: TrainingState, strategy: Strategy,
                 metrics: list[Metric]) -> Iterator[Any]:
    """The epoch's batches after the ``state.batch`` already trained; the RNGs and metric sums
    are restored once those are skipped (skipping may draw from the RNGs, as the first run did)."""
    for _ in range(state.batch):
        next(batches, None)
    restore_replica_state(state, strategy, metrics)
    yield from batches
