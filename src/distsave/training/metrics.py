"""Metrics that accumulate on the device (no sync per step) and merge across replicas."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Metric", "Mean", "SparseCategoricalAccuracy", "CategoricalAccuracy", "BinaryAccuracy",
           "MeanAbsoluteError", "MeanSquaredError", "resolve_metric"]


class Metric:
    """A running ``total / count``; ``update`` stays on the device, ``result`` is a tensor."""

    def __init__(self, name: str | None = None):
        self.name = name or _SNAKE.get(type(self), type(self).__name__.lower())
        self._state: torch.Tensor | None = None

    def reset(self) -> None:
        self._state = None

    def _accumulate(self, total: torch.Tensor, count: torch.Tensor | float) -> None:
        step = torch.stack([total.detach().double(), torch.as_tensor(count, device=total.device).double()])
        self._state = step if self._state is None else self._state + step

    def contribution(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This batch's ``(total, count)``, computed on the device without a sync."""
        raise NotImplementedError

    def update(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
        self._accumulate(*self.contribution(y_pred, y_true))

    def state(self, device: torch.device) -> torch.Tensor:
        return self._state if self._state is not None else torch.zeros(2, dtype=torch.float64, device=device)

    def set_state(self, state: torch.Tensor) -> None:
        self._state = state

    def result(self) -> torch.Tensor:
        if self._state is None:
            return torch.tensor(float("nan"))
        return self._state[0] / self._state[1].clamp_min(1)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


class Mean(Metric):
    def update_value(self, value: torch.Tensor, weight: int) -> None:
        self._accumulate(value * weight, weight)


class SparseCategoricalAccuracy(Metric):
    def contribution(self, y_pred, y_true):
        return (y_pred.argmax(-1) == y_true).sum(), y_true.numel()


class CategoricalAccuracy(Metric):
    def contribution(self, y_pred, y_true):
        return (y_pred.argmax(-1) == y_true.argmax(-1)).sum(), y_true.shape[0]


class BinaryAccuracy(Metric):
    def __init__(self, name: str | None = None, threshold: float = 0.0):
        super().__init__(name)
        self.threshold = threshold  # 0.0 on logits; 0.5 on probabilities

    def contribution(self, y_pred, y_true):
        return ((y_pred > self.threshold) == (y_true > 0.5)).sum(), y_true.numel()

    def get_config(self):
        return {"name": self.name, "threshold": self.threshold}


class MeanAbsoluteError(Metric):
    def contribution(self, y_pred, y_true):
        return (y_pred - y_true.to(y_pred.dtype)).abs().sum(), y_true.numel()


class MeanSquaredError(Metric):
    def contribution(self, y_pred, y_true):
        return (y_pred - y_true.to(y_pred.dtype)).square().sum(), y_true.numel()


_SNAKE = {SparseCategoricalAccuracy: "sparse_categorical_accuracy",
          CategoricalAccuracy: "categorical_accuracy", BinaryAccuracy: "binary_accuracy",
          MeanAbsoluteError: "mean_absolute_error", MeanSquaredError: "mean_squared_error", Mean: "mean"}
_SHORT = {"mae": MeanAbsoluteError, "mse": MeanSquaredError}
BY_NAME: dict[str, type[Metric]] = {name: cls for cls, name in _SNAKE.items() if cls is not Mean}
CLASSES: dict[str, type[Metric]] = {cls.__name__: cls for cls in _SNAKE}


def resolve_metric(metric: str | Metric, loss: Any) -> Metric:
    """Resolve a metric; ``"accuracy"``/``"acc"`` becomes the variant that fits ``loss``, now."""
    loss_accuracy = getattr(loss, "accuracy", None)
    if isinstance(metric, Metric):
        return metric
    if not isinstance(metric, str):
        raise TypeError(f"Expected a metric name or a distsave Metric. Received: {metric!r}.")
    if metric in ("accuracy", "acc"):
        if loss_accuracy is None:
            raise ValueError(
                f"Cannot tell which accuracy {metric!r} means for this loss. Name it: one of "
                f"{sorted(BY_NAME)}."
            )
        if loss_accuracy == "binary_accuracy" and not getattr(loss, "from_logits", True):
            return BinaryAccuracy(name=metric, threshold=0.5)
        return BY_NAME[loss_accuracy](name=metric)
    if metric in _SHORT:
        return _SHORT[metric](name=metric)
    if metric not in BY_NAME:
        raise ValueError(f"Unknown metric {metric!r}. Known names: "
                         f"{['accuracy', *sorted(_SHORT), *sorted(BY_NAME)]}.")
    return BY_NAME[metric]()
