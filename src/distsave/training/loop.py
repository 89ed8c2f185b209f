"""The training, evaluation and prediction loops that `Model` methods drive."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..data.dataset import Dataset
from ..strategies import DistributedDataset, Strategy
from .callbacks import Callback, History, ProgressBar, read_logs
from .metrics import Mean, Metric
from .specs import describe_tensor

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


def _global_batches(data: Dataset | DistributedDataset, strategy: Strategy) -> Iterator[tuple[int, Any]]:
    """Yield ``(global batch size, this replica's part on its device)`` for one pass."""
    dataset = data.dataset if isinstance(data, DistributedDataset) else data
    seed = strategy.broadcast_object(random.getrandbits(63))
    for batch in dataset.iterate(seed):
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        size = len(first) if isinstance(first, torch.Tensor) and first.ndim else 1
        yield size, strategy.shard(batch)


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


def _first_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        return module(x)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"The model failed on the first batch of inputs, a {describe_tensor(x)} tensor: {error}. "
            "Check that the dataset's map gives the dtype and shape the first layer expects "
            "(e.g. float32 [batch, 1, 28, 28] for nn.Conv2d(1, ...))."
        ) from error


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
    train_module = model.train_module()
    loss_metric = Mean("loss")
    metrics = [loss_metric, *model.compiled_metrics]
    history = History()
    steps = data.dataset.cardinality() if isinstance(data, DistributedDataset) else data.cardinality()
    callbacks = [*callbacks, history]
    if verbose and strategy.is_chief:
        callbacks.insert(0, ProgressBar())
    for callback in callbacks:
        callback.set_model(model)
        callback.set_params({"epochs": model.epoch + epochs, "steps": steps, "verbose": verbose})
        callback.on_train_begin()
    replicas = strategy.num_replicas_in_sync
    checked = False
    live = _LiveLogs(metrics)
    for epoch in range(model.epoch, model.epoch + epochs):
        model.train()
        for metric in metrics:
            metric.reset()
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        for index, (global_size, batch) in enumerate(_global_batches(data, strategy)):
            x, y = _split(batch, supervised=True)
            local = len(y)
            if not checked:
                pred = _first_forward(train_module, x)
                model.loss.check(pred, y)
                checked = True
            else:
                pred = train_module(x)
            if local:
                loss = model.loss(pred, y)
                # Each replica's mean loss, scaled so DDP's average is the global-batch mean.
                (loss * (local * replicas / global_size)).backward()
                loss_metric.update_value(loss.detach(), local)
                for metric in model.compiled_metrics:
                    metric.update(pred.detach(), y)
            else:
                (pred.sum() * 0).backward()
            model.optimizer.step()
            model.optimizer.zero_grad(set_to_none=True)
            model.step += 1
            for callback in callbacks:
                callback.on_train_batch_end(index, live)
        logs = _merge(metrics, strategy)
        if validation_data is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(model, validation_data, verbose=0).items()})
            model.train()
        model.epoch = epoch + 1
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
    for callback in callbacks:
        callback.on_train_end()
    return history


@torch.no_grad()
def evaluate(model: Model, data: Dataset | DistributedDataset, *, verbose: int) -> dict[str, float]:
    strategy = model.distribute_strategy
    model.to(strategy.device)
    model.eval()
    loss_metric = Mean("loss")
    metrics = [loss_metric, *model.compiled_metrics]
    for metric in metrics:
        metric.reset()
    for _, batch in _global_batches(data, strategy):
        x, y = _split(batch, supervised=True)
        if len(y) == 0:
            continue
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
    for _, batch in _global_batches(data, strategy):
        x, _ = _split(batch, supervised=False)
        outputs.append(strategy.gather(model(x)) if strategy.num_replicas_in_sync > 1 else model(x))
    return torch.cat(outputs)
