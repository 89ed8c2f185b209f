"""Losses by name or object, each with a JSON config so a saved model can rebuild it.

Names follow Keras; inputs follow PyTorch: models output logits unless ``from_logits=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Loss", "resolve_loss", "SparseCategoricalCrossentropy", "CategoricalCrossentropy",
           "BinaryCrossentropy", "MeanSquaredError", "MeanAbsoluteError", "ModuleLoss"]


class Loss:
    """Mean loss over a batch. ``accuracy`` names the accuracy that ``"accuracy"`` means here."""

    accuracy: str | None = None

    def __call__(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    def check(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
        """Raise a clear error for labels that do not fit this loss (runs on the first batch)."""

    def per_sample(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """One loss value per example (shape ``[batch]``), which sample weights scale."""
        raise TypeError(f"{type(self).__name__} has no per-example form, which sample_weight and "
                        "class_weight need. Use a built-in loss name or an nn loss module.")


def _per_example(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one."""
    return values.reshape(len(values), -1).mean(1) if values.ndim > 1 else values


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"


class SparseCategoricalCrossentropy(Loss):
    """Cross-entropy between class scores ``[B, C]`` and integer labels ``[B]``."""

    accuracy = "sparse_categorical_accuracy"

    def __init__(self, from_logits: bool = True):
        self.from_logits = from_logits

    def __call__(self, y_pred, y_true):
        if self.from_logits:
            return F.cross_entropy(y_pred, y_true)
        return F.nll_loss(torch.log(y_pred.clamp_min(1e-7)), y_true)

    def per_sample(self, y_pred, y_true):
        if self.from_logits:
            return F.cross_entropy(y_pred, y_true, reduction="none")
        return F.nll_loss(torch.log(y_pred.clamp_min(1e-7)), y_true, reduction="none")

    def get_config(self):
        return {"from_logits": self.from_logits}

    def check(self, y_pred, y_true):
        if y_true.is_floating_point() or y_true.dtype == torch.bool:
            raise TypeError(
                "sparse_categorical_crossentropy expects integer class labels of shape [batch]. "
                f"Received labels: {_describe(y_true)}. Cast them with `.long()` in your "
                "dataset's map, or use 'categorical_crossentropy' for one-hot labels."
            )
        if y_pred.ndim != 2 or y_true.shape != y_pred.shape[:1]:
            raise ValueError(
                "sparse_categorical_crossentropy expects predictions [batch, classes] and labels "
                f"[batch]. Received predictions: {_describe(y_pred)}, labels: {_describe(y_true)}."
            )


class CategoricalCrossentropy(Loss):
    """Cross-entropy between class scores ``[B, C]`` and one-hot or soft labels ``[B, C]``."""

    accuracy = "categorical_accuracy"

    def __init__(self, from_logits: bool = True):
        self.from_logits = from_logits

    def __call__(self, y_pred, y_true):
        return self.per_sample(y_pred, y_true).mean()

    def per_sample(self, y_pred, y_true):
        log_p = F.log_softmax(y_pred, -1) if self.from_logits else torch.log(y_pred.clamp_min(1e-7))
        return _per_example(-(y_true * log_p).sum(-1))

    def get_config(self):
        return {"from_logits": self.from_logits}

    def check(self, y_pred, y_true):
        if y_true.shape != y_pred.shape or not y_true.is_floating_point():
            raise ValueError(
                "categorical_crossentropy expects float one-hot labels shaped like the predictions "
                f"{tuple(y_pred.shape)}. Received labels: {_describe(y_true)}. For integer labels "
                "use 'sparse_categorical_crossentropy'."
            )


class BinaryCrossentropy(Loss):
    """Binary cross-entropy between scores and 0/1 labels of the same shape."""

    accuracy = "binary_accuracy"

    def __init__(self, from_logits: bool = True):
        self.from_logits = from_logits

    def __call__(self, y_pred, y_true):
        y_true = y_true.to(y_pred.dtype)
        if self.from_logits:
            return F.binary_cross_entropy_with_logits(y_pred, y_true)
        return F.binary_cross_entropy(y_pred, y_true)

    def per_sample(self, y_pred, y_true):
        y_true = y_true.to(y_pred.dtype)
        if self.from_logits:
            return _per_example(F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none"))
        return _per_example(F.binary_cross_entropy(y_pred, y_true, reduction="none"))

    def get_config(self):
        return {"from_logits": self.from_logits}

    def check(self, y_pred, y_true):
        if y_true.shape != y_pred.shape:
            raise ValueError(
                f"binary_crossentropy expects labels shaped like the predictions {tuple(y_pred.shape)}. "
                f"Received labels: {_describe(y_true)}."
            )


class MeanSquaredError(Loss):
    def __call__(self, y_pred, y_true):
        return F.mse_loss(y_pred, y_true.to(y_pred.dtype))

    def per_sample(self, y_pred, y_true):
        return _per_example(F.mse_loss(y_pred, y_true.to(y_pred.dtype), reduction="none"))


class MeanAbsoluteError(Loss):
    def __call__(self, y_pred, y_true):
        return F.l1_loss(y_pred, y_true.to(y_pred.dtype))

    def per_sample(self, y_pred, y_true):
        return _per_example(F.l1_loss(y_pred, y_true.to(y_pred.dtype), reduction="none"))


class ModuleLoss(Loss):
    """A ``torch.nn`` loss module (``nn.CrossEntropyLoss()``), which takes logits."""

    _ACCURACY = {nn.CrossEntropyLoss: "sparse_categorical_accuracy", nn.NLLLoss:
                 "sparse_categorical_accuracy", nn.BCEWithLogitsLoss: "binary_accuracy"}

    def __init__(self, module: nn.Module):
        self.module = module
        self.accuracy = self._ACCURACY.get(type(module))

    def __call__(self, y_pred, y_true):
        return self.module(y_pred, y_true)

    def per_sample(self, y_pred, y_true):
        if getattr(self.module, "reduction", None) not in ("mean", "sum", "none"):
            return super().per_sample(y_pred, y_true)
        reduction, self.module.reduction = self.module.reduction, "none"
        try:
            return _per_example(self.module(y_pred, y_true))
        finally:
            self.module.reduction = reduction

    def check(self, y_pred, y_true):
        if isinstance(self.module, (nn.CrossEntropyLoss, nn.NLLLoss)) and y_true.shape == y_pred.shape[:1]:
            SparseCategoricalCrossentropy().check(y_pred, y_true)


class FunctionLoss(Loss):
    """A plain function ``fn(y_pred, y_true)``; saved by its registered name."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, y_pred, y_true):
        return self.fn(y_pred, y_true)


BY_NAME: dict[str, type[Loss]] = {
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "binary_crossentropy": BinaryCrossentropy,
    "mean_squared_error": MeanSquaredError, "mse": MeanSquaredError,
    "mean_absolute_error": MeanAbsoluteError, "mae": MeanAbsoluteError,
}


def resolve_loss(loss: str | Loss | nn.Module | Callable) -> Loss:
    """Turn a name, a distsave loss, a torch.nn loss module or a function into a `Loss`."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = loss.lower()
        if key not in BY_NAME:
            raise ValueError(f"Unknown loss {loss!r}. Known names: {sorted(BY_NAME)}; or pass an "
                             "nn.Module loss such as nn.CrossEntropyLoss().")
        return BY_NAME[key]()
    if isinstance(loss, nn.Module):
        return ModuleLoss(loss)
    if callable(loss):
        return FunctionLoss(loss)
    raise TypeError(f"Expected a loss name, a distsave Loss, an nn.Module loss or a function. "
                    f"Received: {loss!r}.")
