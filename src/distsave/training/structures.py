"""Several inputs, several outputs, weighted examples: how a batch meets the model and the loss.

Keras' semantics in PyTorch terms: a tuple (or list) of inputs is unpacked into ``forward``'s
arguments, anything else is passed as one argument; a model may return a dict (or tuple) of
outputs, each with its own loss, loss weight and metrics, named by its key (``output_a_loss``,
``output_a_accuracy``; ``output_0`` for tuple positions). Sample weights (a dataset's third
element, ``sample_weight=``, ``class_weight=``) weight each example's loss as Keras does: the
weighted sum over the batch size. Metrics stay unweighted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .losses import Loss
from .metrics import Metric

__all__ = ["CompiledLoss", "OutputLoss", "Selected", "Weighted", "batch_rows", "call_model",
           "output_name"]

Key = str | int


class Weighted(NamedTuple):
    """Labels with one weight per example."""

    labels: Any
    weights: torch.Tensor


def call_model(module: nn.Module, x: Any) -> Any:
    """``module(*x)`` for a tuple or list of inputs, else ``module(x)``."""
    return module(*x) if isinstance(x, (tuple, list)) else module(x)


def batch_rows(value: Any) -> int:
    """The number of examples in a batch of any structure (its first tensor's length)."""
    leaves = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    return len(leaves[0]) if leaves and leaves[0].ndim else 1


def output_name(key: Key) -> str:
    return key if isinstance(key, str) else f"output_{key}"


def _labels(y: Any) -> tuple[Any, torch.Tensor | None]:
    return (y.labels, y.weights) if isinstance(y, Weighted) else (y, None)


def _select(value: Any, key: Key | None, what: str) -> Any:
    if key is None:
        return value
    if isinstance(key, str):
        if not isinstance(value, Mapping) or key not in value:
            have = f"a dict with keys {sorted(value)}" if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(f"compile() names the output {key!r}, so the {what} must be a dict with "
                             f"that key. Received: {have}. Name the losses by the keys the model "
                             "returns (and give labels as a dict with the same keys).")
        return value[key]
    if not isinstance(value, (tuple, list)) or key >= len(value):
        raise ValueError(f"compile() gives a list of losses, so the {what} must be a tuple or list "
                         f"with at least {key + 1} items. Received: {type(value).__name__}.")
    return value[key]


def _weighted_mean(loss: Loss, pred: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return loss(pred, y)
    per_example = loss.per_sample(pred, y)
    return (per_example * weights.to(per_example.dtype)).sum() / max(len(per_example), 1)


class CompiledLoss:
    """The loss ``compile`` gave, applied to whole batches: one loss, or one per output."""

    def __init__(self, loss: Loss | Mapping[str, Loss] | Sequence[Loss],
                 loss_weights: Mapping[str, float] | Sequence[float] | None = None):
        self.losses: dict[Key | None, Loss]
        if isinstance(loss, Loss):
            self.losses = {None: loss}
        elif isinstance(loss, Mapping):
            self.losses = dict(loss)
        else:
            self.losses = dict(enumerate(loss))
        self.weights = {key: 1.0 for key in self.losses}
        if loss_weights is not None:
            given = dict(loss_weights) if isinstance(loss_weights, Mapping) else dict(enumerate(loss_weights))
            unknown = set(given) - set(self.losses)
            if unknown or None in self.losses:
                raise ValueError(f"loss_weights names outputs {sorted(map(str, given))}, but the "
                                 f"losses are for {sorted(map(str, self.losses))}. Give one weight "
                                 "per output named in loss=.")
            self.weights.update({k: float(v) for k, v in given.items()})

    @property
    def structured(self) -> bool:
        return None not in self.losses

    def term(self, key: Key | None, pred: Any, y: Any) -> torch.Tensor:
        """One output's (weighted-example) loss, before its loss weight."""
        labels, weights = _labels(y)
        return _weighted_mean(self.losses[key], _select(pred, key, "model's output"),
                              _select(labels, key, "labels"), weights)

    def __call__(self, pred: Any, y: Any) -> torch.Tensor:
        if not self.structured:
            return self.term(None, pred, y)
        return sum(self.weights[k] * self.term(k, pred, y) for k in self.losses)

    def check(self, pred: Any, y: Any) -> None:
        """Clear errors for outputs or labels that do not fit the losses (first batch)."""
        labels, _ = _labels(y)
        if not self.structured and not isinstance(pred, torch.Tensor):
            kind = f"a dict with keys {sorted(pred)}" if isinstance(pred, Mapping) else type(pred).__name__
            raise ValueError(f"The model returns {kind}, but compile() was given one loss. Give one "
                             "loss per output: loss={'name': 'mse', ...} (a list for tuple outputs).")
        for key, loss in self.losses.items():
            loss.check(_select(pred, key, "model's output"), _select(labels, key, "labels"))

    def output_losses(self) -> list[Metric]:
        """Per-output loss means for the progress bar and History (none for one output)."""
        return [OutputLoss(self, key) for key in self.losses] if self.structured else []


class OutputLoss(Metric):
    """One output's loss, as a running mean (``output_a_loss``)."""

    def __init__(self, compiled: CompiledLoss, key: Key):
        super().__init__(f"{output_name(key)}_loss")
        self.compiled, self.key = compiled, key

    def contribution(self, y_pred, y_true):
        n = batch_rows(y_true)
        return self.compiled.term(self.key, y_pred, y_true).detach() * n, n


class Selected(Metric):
    """A compiled metric seen through one output (or the only one) and without sample weights;
    its state is the wrapped metric's, so results show under the wrapped metric's name."""

    def __init__(self, metric: Metric, key: Key | None):
        self.metric, self.key = metric, key
        self.name = metric.name

    def contribution(self, y_pred, y_true):
        labels, _ = _labels(y_true)
        return self.metric.contribution(_select(y_pred, self.key, "model's output"),
                                        _select(labels, self.key, "labels"))

    def reset(self) -> None:
        self.metric.reset()

    def state(self, device: torch.device) -> torch.Tensor:
        return self.metric.state(device)

    def set_state(self, state: torch.Tensor) -> None:
        self.metric.set_state(state)

    def result(self) -> torch.Tensor:
        return self.metric.result()

    def update(self, y_pred, y_true) -> None:
        self.metric._accumulate(*self.contribution(y_pred, y_true))
