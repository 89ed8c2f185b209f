"""The training, evaluation and prediction loops that `Model` methods drive."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from ..data.dataset import Dataset, Table
from ..strategies import DistributedDataset, Strategy
from .callbacks import Callback, History, ProgressBar, read_logs
from .cpu_step import fast_cpu_inference
from .interrupts import Interrupts, TrainingPreempted
from .metrics import Mean, Metric
from .steps import make_train_step

if TYPE_CHECKING:
    from .model import Model

__all__ = ["as_dataset", "evaluate", "fit", "predict"]


def as_dataset(x: Any, y: torch.Tensor | None, batch_size: int) -> Dataset | DistributedDataset:
    """Accept a dataset as is; wrap tensors into a batched dataset as Keras does for arrays."""
    if isinstance(x, (Dataset, DistributedDataset)):
        if y is not None:
            raise ValueError("Pass labels inside the dataset; y= is only for tensor inputs.")
        return x
    if isinstance(x, torch.Tensor):
        return Dataset.from_tensor_slices(x if y is None else (x, y)).batch(batch_size)
    raise TypeError(f"Expected a distsave Dataset or a tensor. Received: {type(x).__name__}.")


_DEVICE_TABLES = 4  # datasets kept on a device per model (train, validation, ...)


def _device_tensors(model: Model, table: Table, device: torch.device) -> Any | None:
    """The table's tensors on ``device``, moved once and kept (if they fit comfortably)."""
    cache: dict = model.runtime.device_tables
    key = (id(table.tensors), device)
    if key not in cache:
        nbytes = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(table.tensors))
        if nbytes > torch.cuda.mem_get_info(device)[0] // 4:
            return None
        while len(cache) >= _DEVICE_TABLES:
            cache.pop(next(iter(cache)))
        cache[key] = (table.tensors, pytree.tree_map(lambda t: t.to(device), table.tensors))
    return cache[key][1]


def _global_batches(model: Model, data: Dataset | DistributedDataset,
                    strategy: Strategy) -> Iterator[tuple[int, Any]]:
    """Yield ``(global batch size, this replica's part on its device)`` for one pass.

    On a GPU, a table-backed pipeline (slices, cache, shuffle, batch) is moved to the device
    once and each batch is gathered there: no host work or copy per step.
    """
    dataset = data.dataset if isinstance(data, DistributedDataset) else data
    seed = strategy.broadcast_object(random.getrandbits(63))
    row_batches = getattr(dataset, "row_batches", None)
    rows = row_batches(seed) if row_batches is not None and strategy.device.type == "cuda" else None
    tensors = _device_tensors(model, rows[0], strategy.device) if rows else None
    if tensors is None:
        for batch in dataset.iterate(seed) if rows is None else (rows[0].gather(b) for b in rows[1]):
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            size = len(first) if isinstance(first, torch.Tensor) and first.ndim else 1
            yield size, strategy.shard(batch)
        return
    sizes = [len(b) for b in rows[1]]
    order = torch.cat(rows[1]).to(strategy.device, non_blocking=True) if sizes else None
    for size, indices in zip(sizes, order.split(sizes) if sizes else []):
        if strategy.num_replicas_in_sync > 1:
            indices = torch.tensor_split(indices, strategy.num_replicas_in_sync)[strategy.replica_id]
        yield size, pytree.tree_map(lambda t: t[indices], tensors)


def _split(batch: Any, supervised: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if supervised:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            kind = (f"a dict with keys {sorted(batch)}" if isinstance(batch, dict)
                    else f"{type(batch).__name__} of length {len(batch)}"
                    if isinstance(batch, (tuple, list)) else type(batch).__name__)
            raise TypeError(
                f"Expected a dataset of (inputs, labels) pairs of tensors. Received batches of {kind}. "
                "Load with as_supervised=True, or map elements to (inputs, labels) tuples."
            )
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)):
        return batch[0], None
    return batch, None


class _LiveLogs(Mapping):
    """Metric results computed only when a callback reads them."""

    def __init__(self, metrics: list[Metric]):
        self._metrics = {m.name: m for m in metrics}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._metrics[key].result()

    def __iter__(self):
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)


def _merge(metrics: list[Metric], strategy: Strategy) -> dict[str, float]:
    states = torch.stack([m.state(strategy.device) for m in metrics])
    if strategy.num_replicas_in_sync > 1:
        states = strategy.all_reduce_sum(states)
    for metric, state in zip(metrics, states):
        metric.set_state(state)
    return read_logs({m.name: m.result() for m in metrics})


def fit(model: Model, data: Dataset | DistributedDataset, *, epochs: int,
        validation_data: Any, callbacks: list[Callback], verbose: int) -> History:
    strategy = model.distribute_strategy
    model.to(strategy.device)
    metrics = [Mean("loss"), *model.compiled_metrics]
    step = make_train_step(model, model.train_module(), strategy, metrics)
    history = History()
    steps = data.dataset.cardinality() if isinstance(data, DistributedDataset) else data.cardinality()
    callbacks = [*callbacks, history]
    if verbose and strategy.is_chief:
        callbacks.insert(0, ProgressBar())
    last_epoch = model.epoch + epochs  # a callback restoring a backup moves model.epoch, not this
    model.stop_training = False
    for callback in callbacks:
        callback.set_model(model)
        callback.set_params({"epochs": last_epoch, "steps": steps, "verbose": verbose,
                             "data": data, "metrics": metrics})
        callback.on_train_begin()
    live = _LiveLogs(metrics)
    interrupts = Interrupts(strategy)  # SIGTERM is caught until it is closed
    try:
        for epoch in range(model.epoch, last_epoch):
            model.train()
            step.begin_epoch()
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            batches = enumerate(_global_batches(model, data, strategy))
            for callback in callbacks:
                batches = callback.on_epoch_batches(epoch, batches)
            for index, (global_size, batch) in batches:
                x, y = _split(batch, supervised=True)
                step(x, y, global_size)
                model.step += 1
                for callback in callbacks:
                    callback.on_train_batch_end(index, live)
                preempted, model.stop_training = interrupts.agree(model.stop_training)
                if preempted:
                    _preempt(model, callbacks, epoch, index + 1)
                if model.stop_training:
                    break
            logs = _merge(metrics, strategy)
            if validation_data is not None:
                logs.update({f"val_{k}": v for k, v in evaluate(model, validation_data, verbose=0).items()})
                model.train()
            model.epoch = epoch + 1
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    finally:
        interrupts.close()
        step.end()
    interrupts.deliver_pending()
    for callback in callbacks:
        callback.on_train_end()
    return history


def _preempt(model: Model, callbacks: list[Callback], epoch: int, batch: int) -> None:
    """Let callbacks save (every replica, same step), say so on stderr, end with code 143."""
    notes = [note for callback in callbacks if (note := callback.on_preempted(epoch, batch))]
    message = (f"distsave: fit stopped on SIGTERM after step {model.step} (epoch {epoch + 1}, batch "
               f"{batch}). " + (" ".join(notes) if notes else "No BackupAndRestore callback was "
                                "given, so the progress since the last save is lost."))
    if model.distribute_strategy.is_chief:
        print(message, file=sys.stderr, flush=True)
    raise TrainingPreempted(message)


@torch.no_grad()
def evaluate(model: Model, data: Dataset | DistributedDataset, *, verbose: int) -> dict[str, float]:
    strategy = model.distribute_strategy
    model.to(strategy.device)
    model.eval()
    loss_metric = Mean("loss")
    metrics = [loss_metric, *model.compiled_metrics]
    for metric in metrics:
        metric.reset()
    for _, batch in _global_batches(model, data, strategy):
        x, y = _split(batch, supervised=True)
        if len(y) == 0:
            continue
        with fast_cpu_inference(model, strategy.device):
            pred = model(x)
        loss_metric.update_value(model.loss(pred, y), len(y))
        for metric in model.compiled_metrics:
            metric.update(pred, y)
    logs = _merge(metrics, strategy)
    if verbose and strategy.is_chief:
        print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
    return logs


@torch.no_grad()
def predict(model: Model, data: Dataset | DistributedDataset) -> torch.Tensor:
    strategy = model.distribute_strategy
    model.to(strategy.device)
    model.eval()
    outputs = []
    for _, batch in _global_batches(model, data, strategy):
        x, _ = _split(batch, supervised=False)
        with fast_cpu_inference(model, strategy.device):
            pred = model(x)
        outputs.append(strategy.gather(pred) if strategy.num_replicas_in_sync > 1 else pred)
    return torch.cat(outputs)
