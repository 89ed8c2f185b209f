"""`Model` and `Sequential`: an ``nn.Module`` with Keras' compile / fit / evaluate / predict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..strategies import Strategy, get_strategy, has_strategy
from . import loop
from .callbacks import Callback, History
from .losses import Loss, resolve_loss
from .metrics import Metric, resolve_metric
from .optimizers import OptimizerLike, build_optimizer
from .specs import TensorSpec, describe_tensor

__all__ = ["Model", "Sequential"]


def _as_specs(spec: TensorSpec | Sequence[TensorSpec] | None) -> list[TensorSpec] | None:
    if spec is None:
        return None
    specs = [spec] if isinstance(spec, TensorSpec) else list(spec)
    if not all(isinstance(s, TensorSpec) for s in specs):
        raise TypeError(f"Expected input_spec as a distsave.TensorSpec or a list of them. Received: {spec!r}.")
    return specs


class Runtime:
    """What a model holds while it runs, apart from what it is: the strategy it runs under, its
    optimizer, the training wrapper (DDP) and datasets kept on its device. A copy of the model
    (an export copy) shares it rather than copying processes groups, optimizer state or data."""

    def __init__(self, strategy: Strategy | None):
        self.strategy = strategy
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_module: nn.Module | None = None
        self.device_tables: dict = {}

    def __deepcopy__(self, memo: dict) -> Runtime:
        return self


class Model(nn.Module):
    """A trainable model: wrap any ``nn.Module``, or subclass and define ``forward``.

    Args:
        module: The network to wrap (``Model(my_module)``); omit when subclassing.
        input_spec: What the model takes (`TensorSpec` or a list); otherwise learnt from the
            first call or the first batch of ``fit``.

    Example:
        >>> model = Model(nn.Linear(4, 2), input_spec=TensorSpec((None, 4)))
        >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    """

    def __init__(self, module: nn.Module | None = None, *,
                 input_spec: TensorSpec | Sequence[TensorSpec] | None = None):
        super().__init__()
        if module is not None:
            if not isinstance(module, nn.Module):
                raise TypeError(f"Expected an nn.Module to wrap. Received: {type(module).__name__}.")
            self.network = module
        self.input_spec = _as_specs(input_spec)
        self.loss: Loss | None = None
        self.compiled_metrics: list[Metric] = []
        self.epoch = 0
        self.step = 0
        self.jit_compile: bool | str = "auto"
        self.runtime = Runtime(get_strategy() if has_strategy() else None)
        self.register_forward_pre_hook(_check_or_record_inputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "network" not in self._modules:
            raise NotImplementedError(f"{type(self).__name__} must define forward(), or wrap a "
                                      "module: distsave.Model(my_module).")
        return self.network(*args, **kwargs)

    # -- inputs -------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec] | None:
        """The input specs, or None until given, seen in a call, or seen by ``fit``."""
        return self.input_spec

    @property
    def distribute_strategy(self) -> Strategy:
        """The strategy this model runs under: the one in scope when built, compiled or loaded."""
        return self.runtime.strategy or get_strategy()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer ``compile`` built (None before)."""
        return self.runtime.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.runtime.optimizer = optimizer
        self.runtime.train_module = None

    # -- compile ------------------------------------------------------------------------
    def compile(self, optimizer: OptimizerLike = "rmsprop",
                loss: str | Loss | nn.Module | Callable | None = None,
                metrics: Sequence[str | Metric] | None = None, *,
                jit_compile: bool | str = "auto") -> None:
        """Choose the loss, optimizer and metrics; names are resolved now and kept resolved.

        Args:
            optimizer: A name (``"adam"``), a ``torch.optim`` class, a factory
                ``params -> Optimizer``, or an optimizer over this model's parameters.
            loss: A name (``"sparse_categorical_crossentropy"``; models output logits), a
                distsave `Loss`, an ``nn`` loss module, or a function ``(y_pred, y_true)``.
            metrics: Names or `Metric` objects; ``"accuracy"`` becomes the variant that fits
                the loss (sparse categorical for integer labels) and stays so after loading.
            jit_compile: ``"auto"`` captures the whole train step as a CUDA graph where that is
                safe (one GPU replica, a capturable optimizer) and falls back to eager with a
                log line where capture fails; ``True`` requires it; ``False`` never does it.

        Raises:
            ValueError: an unknown name. TypeError: an object of the wrong kind.
        """
        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='sparse_categorical_crossentropy'.")
        if jit_compile not in (True, False, "auto"):
            raise ValueError(f"Expected jit_compile=True, False or 'auto'. Received: {jit_compile!r}.")
        self.jit_compile = jit_compile
        if has_strategy():
            self.runtime.strategy = get_strategy()
        self.distribute_strategy.place_model(self)  # before the optimizer: it holds what this makes
        self.loss = resolve_loss(loss)
        self.compiled_metrics = [resolve_metric(m, self.loss) for m in (metrics or [])]
        self.optimizer = build_optimizer(optimizer, self)

    @property
    def compiled(self) -> bool:
        return self.loss is not None and self.optimizer is not None

    # -- training and inference ---------------------------------------------------------
    def fit(self, x: Any, y: torch.Tensor | None = None, *, batch_size: int = 32, epochs: int = 1,
            validation_data: Any = None, callbacks: Sequence[Callback] | None = None,
            verbose: int = 1) -> History:
        """Train for ``epochs`` passes over a dataset of ``(inputs, labels)`` batches.

        Under a multi-replica strategy each global batch is split across replicas and the
        gradients averaged, so the result matches one replica on the whole batch.

        Args:
            x: A `Dataset` (or distributed dataset) of ``(inputs, labels)``; or input tensors.
            y: Label tensors when ``x`` is a tensor.
            batch_size: Batch size when ``x`` is a tensor.
            epochs: Number of passes.
            validation_data: A dataset evaluated after each epoch (``val_`` metrics).
            callbacks: Extra `Callback` objects.
            verbose: 1 shows a progress bar on the chief replica; 0 is silent.

        Returns:
            A `History` whose ``history`` maps metric names to per-epoch values.

        Raises:
            RuntimeError: the model was not compiled. TypeError/ValueError: the data's
            structure, dtypes or shapes do not fit the model or the loss (message says which).
        """
        if not self.compiled:
            raise RuntimeError("Call model.compile(optimizer=..., loss=...) before fit().")
        return self.distribute_strategy.call_on_replicas(
            loop.fit, self, loop.as_dataset(x, y, batch_size), epochs=epochs,
            validation_data=validation_data, callbacks=list(callbacks or []), verbose=verbose)

    def evaluate(self, x: Any, y: torch.Tensor | None = None, *, batch_size: int = 32,
                 verbose: int = 1, return_dict: bool = False) -> list[float] | dict[str, float]:
        """Loss and metrics over a dataset, merged across replicas: ``[loss, *metrics]``."""
        if self.loss is None:
            raise RuntimeError("Call model.compile(...) before evaluate(); it needs a loss.")
        logs = self.distribute_strategy.call_on_replicas(loop.evaluate, self, loop.as_dataset(x, y, batch_size),
                                                         verbose=verbose)
        return logs if return_dict else list(logs.values())

    def predict(self, x: Any, *, batch_size: int = 32) -> torch.Tensor:
        """Outputs for every input, in order, gathered from all replicas."""
        return self.distribute_strategy.call_on_replicas(loop.predict, self, loop.as_dataset(x, None, batch_size))

    def summary(self, print_fn: Callable[[str], Any] = print) -> None:
        """Print a Keras-style table: each layer's output shape and parameters, then the totals."""
        from .summary import format_summary

        print_fn(format_summary(self, self.input_spec))

    def count_params(self) -> int:
        """The number of parameters (each shared tensor once)."""
        from .summary import count_params

        return count_params(self)

    def save(self, path: str, *, max_shard_size: int | None = None, blocking: bool = True) -> Any:
        """Write this model as a distsave model directory; see `distsave.saving.save_model`.

        ``blocking=False`` returns once the tensors are in host memory and writes in the
        background; `distsave.wait_for_saves()` (or the returned handle's ``result()``) waits.
        """
        from ..saving.model_format import save_model  # saving builds on training, not the reverse

        return save_model(self, path, max_shard_size=max_shard_size, blocking=blocking)

    def train_module(self) -> nn.Module:
        """The module a training step calls: this model, or its data-parallel wrapper."""
        if self.runtime.train_module is None:
            self.runtime.train_module = self.distribute_strategy.prepare_for_training(self)
        return self.runtime.train_module


def _check_or_record_inputs(model: Model, args: tuple) -> None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or len(tensors) != len(args):
        return
    if model.input_spec is None:
        names = ["x"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
        model.input_spec = [TensorSpec.from_tensor(t, n) for t, n in zip(tensors, names)]
        return
    if len(tensors) != len(model.input_spec) or not all(
            s.matches(t) for s, t in zip(model.input_spec, tensors)):
        expected = ", ".join(s.describe() for s in model.input_spec)
        received = ", ".join(describe_tensor(t) for t in tensors)
        raise ValueError(
            f"{type(model).__name__} expects inputs ({expected}). Received: ({received}). "
            "Fix the inputs (e.g. map images to float32 with the right shape), or build the model "
            "with a different input_spec."
        )


class Sequential(Model):
    """A stack of layers called in order, as ``keras.Sequential`` / ``nn.Sequential``.

    Example:
        >>> model = Sequential([nn.Flatten(), nn.Linear(784, 10)])
    """

    def __init__(self, layers: Sequence[nn.Module] = (), *,
                 input_spec: TensorSpec | Sequence[TensorSpec] | None = None):
        super().__init__(input_spec=input_spec)
        for layer in layers:
            self.add(layer)

    def add(self, layer: nn.Module) -> None:
        """Append a layer."""
        if not isinstance(layer, nn.Module):
            raise TypeError(f"Sequential layers must be nn.Modules. Received: {type(layer).__name__}.")
        self.add_module(str(len(self._modules)), layer)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self._modules.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._modules.values():
            x = layer(x)
        return x
