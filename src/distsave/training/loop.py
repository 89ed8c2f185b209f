"""The training, evaluation and prediction loops that `Model` methods drive."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from ..data import seeds
from ..data.dataset import Dataset, Table
from ..strategies import DistributedDataset, Strategy
from .callbacks import Callback, History, ProgressBar, read_logs
from .cpu_step import fast_cpu_inference
from .interrupts import Interrupts, TrainingPreempted
from .metrics import Mean, Metric
from .steps import make_train_step
from .structures import Selected, Weighted, batch_rows, call_model

if TYPE_CHECKING:
    from .model import Model

__all__ = ["FitPlan", "evaluate", "fit", "predict"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FitPlan:
    """How long `fit` trains and when it validates (Keras' keyword arguments)."""

    epochs: int
    initial_epoch: int | None = None
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    validation_freq: int = 1
    class_weight: dict[int, float] | None = None

    def __post_init__(self) -> None:
        for name in ("steps_per_epoch", "validation_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Expected {name} >= 1 or None. Received: {name}={value}.")
        if self.validation_freq < 1:
            raise ValueError(f"Expected validation_freq >= 1. Received: {self.validation_freq}.")

    def epoch_range(self, model_epoch: int) -> range:
        if self.initial_epoch is None:
            return range(model_epoch, model_epoch + self.epochs)
        return range(self.initial_epoch, self.epochs)


def _on_device(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(
        lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


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
    seed = strategy.broadcast_object(seeds.draw_seed())
    own = dataset.replica_batches(seed, strategy.num_replicas_in_sync, strategy.replica_id)
    if own is not None:  # each replica loads only its part (a DataLoader over a map-style dataset)
        for size, part in own:
            yield size, _on_device(part, strategy.device)
        return
    row_batches = getattr(dataset, "row_batches", None)
    rows = row_batches(seed) if row_batches is not None and strategy.device.type == "cuda" else None
    tensors = _device_tensors(model, rows[0], strategy.device) if rows else None
    if tensors is None:
        for batch in dataset.iterate(seed) if rows is None else (rows[0].gather(b) for b in rows[1]):
            yield batch_rows(batch), strategy.shard(batch)
        return
    sizes = [len(b) for b in rows[1]]
    order = torch.cat(rows[1]).to(strategy.device, non_blocking=True) if sizes else None
    for size, indices in zip(sizes, order.split(sizes) if sizes else []):
        if strategy.num_replicas_in_sync > 1:
            indices = torch.tensor_split(indices, strategy.num_replicas_in_sync)[strategy.replica_id]
        yield size, pytree.tree_map(lambda t: t[indices], tensors)


def _labels(batch: Any, class_weight: dict[int, float] | None = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a supervised batch; labels become `Weighted` where the batch has
    sample weights (its third item) or ``class_weight`` is given."""
    if not (isinstance(batch, (tuple, list)) and len(batch) in (2, 3)):
        kind = (f"a dict with keys {sorted(batch)}" if isinstance(batch, dict)
                else f"{type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list)) else type(batch).__name__)
        raise TypeError(
            "Expected batches of (inputs, labels) pairs or (inputs, labels, sample_weights) "
            f"triples. Received batches of {kind}. Load with as_supervised=True, or map elements "
            "to (inputs, labels) tuples.")
    x, y = batch[0], batch[1]
    weights = batch[2] if len(batch) == 3 else None
    if class_weight is not None:
        if not isinstance(y, torch.Tensor) or y.is_floating_point():
            raise ValueError("class_weight needs integer class labels (one tensor of shape [batch]). "
                             "For other labels pass sample weights instead.")
        table = torch.zeros(max(max(class_weight), int(y.max()) if y.numel() else 0) + 1, device=y.device)
        for label, weight in class_weight.items():
            table[label] = weight
        # classes missing from class_weight keep weight 1, as Keras does
        missing = torch.ones_like(table, dtype=torch.bool)
        missing[list(class_weight)] = False
        table[missing] = 1.0
        class_weights = table[y]
        weights = class_weights if weights is None else weights * class_weights
    return x, (y if weights is None else Weighted(y, weights))


def _inputs(batch: Any) -> Any:
    """The inputs of a batch: its first item when it is an ``(inputs,)``, ``(inputs, labels)`` or
    ``(inputs, labels, weights)`` tuple (so several inputs without labels come as ``((a, b),)``)."""
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) in (1, 2, 3) else batch


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


def _check_optimizer_holds_parameters(model: Model, strategy: Strategy) -> None:
    """An optimizer built before a strategy replaced the parameters (sharding does) would
    step tensors the model no longer uses: training would silently change nothing."""
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in model.optimizer.param_groups for p in group["params"]):
        raise RuntimeError(
            f"The optimizer holds parameters that the model no longer has: {strategy!r} replaced "
            "them when it placed the model (sharding makes new, sharded parameters). Build and "
            "compile the model inside strategy.scope(), so the optimizer is made over them."
        )


def _train_metrics(model: Model) -> list[Metric]:
    """What a step and an evaluation track: the loss, each output's loss, the compiled metrics."""
    return [Mean("loss"), *model.compiled_loss.output_losses(),
            *(Selected(m, key) for m, key in zip(model.compiled_metrics, model.metric_outputs))]


class _Epochs:
    """Each epoch's batches: a fresh pass, or with ``steps_per_epoch`` the next that many batches
    of a pass that carries on across epochs (a new pass starts when one runs out)."""

    def __init__(self, model: Model, data: Dataset | DistributedDataset, steps: int | None):
        self.model, self.data, self.steps = model, data, steps
        self._pass: Iterator[tuple[int, Any]] | None = None
        self.exhausted = False

    def __call__(self) -> Iterator[tuple[int, Any]]:
        strategy = self.model.distribute_strategy
        if self.steps is None:
            return _global_batches(self.model, self.data, strategy)
        return self._carry_on(strategy)

    def _carry_on(self, strategy: Strategy) -> Iterator[tuple[int, Any]]:
        for _ in range(self.steps):
            batch = next(self._pass, None) if self._pass is not None else None
            if batch is None:
                try:
                    self._pass = _global_batches(self.model, self.data, strategy)
                    batch = next(self._pass, None)
                except ValueError as spent:  # a generator object read to its end
                    logger.warning("fit: %s", spent)
                    batch = None
            if batch is None:
                logger.warning("fit: the data ran out before steps_per_epoch=%d steps; training stops.",
                               self.steps)
                self.exhausted = True
                return
            yield batch


def fit(model: Model, data: Dataset | DistributedDataset, plan: FitPlan, *,
        validation_data: Any, callbacks: list[Callback], verbose: int) -> History:
    strategy = model.distribute_strategy
    model.replicas_agree()
    strategy.place_model(model)
    _check_optimizer_holds_parameters(model, strategy)
    seeds.follow_torch()
    metrics = _train_metrics(model)
    step = make_train_step(model, model.train_module(), strategy, metrics)
    history = History()
    steps = plan.steps_per_epoch or (data.dataset.cardinality() if isinstance(data, DistributedDataset)
                                     else data.cardinality())
    epochs = plan.epoch_range(model.epoch)
    callbacks = [*callbacks, history]
    if verbose and strategy.is_chief:
        callbacks.insert(0, ProgressBar())
    last_epoch = epochs.stop  # a callback restoring a backup moves model.epoch, not this
    model.stop_training = False
    model.epoch = epochs.start
    for callback in callbacks:
        callback.set_model(model)
        callback.set_params({"epochs": last_epoch, "steps": steps, "verbose": verbose,
                             "data": data, "metrics": metrics})
        callback.on_train_begin()
    live = _LiveLogs(metrics)
    epoch_batches = _Epochs(model, data, plan.steps_per_epoch)
    interrupts = Interrupts(strategy)  # SIGTERM is caught until it is closed
    mode = model.training
    try:
        for epoch in range(model.epoch, last_epoch):
            model.train()
            step.begin_epoch()
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            batches = enumerate(epoch_batches())
            for callback in callbacks:
                batches = callback.on_epoch_batches(epoch, batches)
            trained = 0
            for index, (global_size, batch) in batches:
                trained += 1
                x, y = _labels(batch, plan.class_weight)
                step(x, y, global_size)
                model.step += 1
                for callback in callbacks:
                    callback.on_train_batch_end(index, live)
                preempted, model.stop_training = interrupts.agree(model.stop_training)
                if preempted:
                    _preempt(model, callbacks, epoch, index + 1)
                if model.stop_training:
                    break
            if epoch_batches.exhausted and not trained:
                break  # steps_per_epoch over a spent stream: nothing left to train or report
            logs = _merge(metrics, strategy)
            if validation_data is not None and (epoch + 1 - epochs.start) % plan.validation_freq == 0:
                logs.update({f"val_{k}": v for k, v in evaluate(
                    model, validation_data, verbose=0, steps=plan.validation_steps).items()})
            model.epoch = epoch + 1
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            if model.stop_training or epoch_batches.exhausted:
                break
    finally:
        interrupts.close()
        step.end()
        model.train(mode)
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
def evaluate(model: Model, data: Dataset | DistributedDataset, *, verbose: int,
             steps: int | None = None) -> dict[str, float]:
    """Loss and metrics over ``data`` in eval mode (the model's mode is put back after)."""
    strategy = model.distribute_strategy
    model.replicas_agree()
    strategy.place_model(model)
    metrics = _train_metrics(model)
    for metric in metrics:
        metric.reset()
    mode = model.training
    model.eval()
    try:
        for _, batch in itertools.islice(_global_batches(model, data, strategy), steps):
            x, y = _labels(batch)
            count = batch_rows(y)
            with model.precision.autocast(strategy.device), fast_cpu_inference(model, strategy.device):
                pred = call_model(model, x)  # even on an empty part: a sharded model gathers weights
                if count == 0:
                    continue
                metrics[0].update_value(model.compiled_loss(pred, y).float(), count)
                for metric in metrics[1:]:
                    metric.update(pred, y)
    finally:
        model.train(mode)
    logs = _merge(metrics, strategy)
    if verbose and strategy.is_chief:
        print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
    return logs


@torch.no_grad()
def predict(model: Model, data: Dataset | DistributedDataset, *, steps: int | None = None) -> Any:
    """Every output in order, gathered from all replicas, in eval mode."""
    strategy = model.distribute_strategy
    model.replicas_agree()
    strategy.place_model(model)
    outputs = []
    mode = model.training
    model.eval()
    try:
        for _, batch in itertools.islice(_global_batches(model, data, strategy), steps):
            with model.precision.autocast(strategy.device), fast_cpu_inference(model, strategy.device):
                out = call_model(model, _inputs(batch))
            outputs.append(strategy.gather(out) if strategy.num_replicas_in_sync > 1 else out)
    finally:
        model.train(mode)
    if not outputs:
        raise ValueError("predict() got no batches: the data is empty.")
    return pytree.tree_map(lambda *parts: torch.cat(parts), *outputs)
