"""`Model` and `Sequential`: an ``nn.Module`` with Keras' compile / fit / evaluate / predict."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.adapters import as_dataset, is_arrays, split_validation
from ..strategies import Strategy, get_strategy, has_strategy
from . import loop
from .callbacks import Callback, History
from .losses import Loss, resolve_loss
from .metrics import Metric, resolve_metric
from .optimizers import OptimizerLike, build_optimizer
from .precision import Precision
from .specs import TensorSpec, describe_tensor
from .structures import CompiledLoss, Key, output_name

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
        self.replicas_synced = False

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
        self.loss: Loss | dict[Key, Loss] | None = None
        self.compiled_loss: CompiledLoss | None = None
        self.loss_weights: dict[Key, float] | None = None
        self.compiled_metrics: list[Metric] = []
        self.metric_outputs: list[Key | None] = []
        self.precision = Precision("32")
        self.epoch = 0
        self.step = 0
        self.jit_compile: bool | str = "auto"
        self.runtime = Runtime(get_strategy() if has_strategy() else None)
        self.register_forward_pre_hook(_check_inputs)
        self.register_forward_hook(_record_inputs)

    def __call__(self, *args: Any, training: bool | None = None, **kwargs: Any) -> Any:
        """Call the model; ``training=True``/``False`` runs it in that mode for this call only
        (as Keras' ``model(x, training=...)``), else in its current mode."""
        if training is None or bool(training) == self.training:
            return super().__call__(*args, **kwargs)
        mode = self.training
        self.train(bool(training))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.train(mode)

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
                loss: LossLike | Mapping[str, LossLike] | Sequence[LossLike] | None = None,
                metrics: Sequence[str | Metric] | Mapping[str, Sequence[str | Metric]] | None = None,
                *, loss_weights: Mapping[str, float] | Sequence[float] | None = None,
                jit_compile: bool | str = "auto", precision: str = "32") -> None:
        """Choose the loss, optimizer and metrics; names are resolved now and kept resolved.

        Args:
            optimizer: A name (``"adam"``), a ``torch.optim`` class, a factory
                ``params -> Optimizer``, or an optimizer over this model's parameters.
            loss: A name (``"sparse_categorical_crossentropy"``; models output logits), a
                distsave `Loss`, an ``nn`` loss module, or a function ``(y_pred, y_true)``.
                For a model with several outputs, a dict ``{output key: loss}`` (a list for
                tuple outputs); each output's loss shows as ``{key}_loss``.
            metrics: Names or `Metric` objects; ``"accuracy"`` becomes the variant that fits
                the loss (sparse categorical for integer labels) and stays so after loading.
                With several outputs, a dict ``{output key: [metrics]}`` (named
                ``{key}_{metric}``), or a list applied to every output.
            loss_weights: With several outputs, each output loss's weight in the total.
            jit_compile: ``"auto"`` captures the whole train step as a CUDA graph where that is
                safe (one GPU replica, a capturable optimizer) and falls back to eager with a
                log line where capture fails; ``True`` requires it; ``False`` never does it.
            precision: ``"32"`` (default), ``"bf16-mixed"`` or ``"16-mixed"`` (autocast; float16
                with loss scaling); saved with the model and restored by ``load_model``.

        Raises:
            ValueError: an unknown name. TypeError: an object of the wrong kind.
        """
        if loss is None:
            raise ValueError("compile() needs a loss, e.g. loss='sparse_categorical_crossentropy'.")
        if jit_compile not in (True, False, "auto"):
            raise ValueError(f"Expected jit_compile=True, False or 'auto'. Received: {jit_compile!r}.")
        self.jit_compile = jit_compile
        self.precision = Precision(precision)
        if has_strategy():
            self.runtime.strategy = get_strategy()
        self.replicas_agree()  # before placing: a sharding strategy then shards one model
        self.distribute_strategy.place_model(self)  # before the optimizer: it holds what this makes
        self.loss = (resolve_loss(loss) if isinstance(loss, (str, Loss, nn.Module)) or callable(loss)
                     else _per_output(loss, resolve_loss))
        self.compiled_loss = CompiledLoss(self.loss, loss_weights)
        self.loss_weights = self.compiled_loss.weights if self.compiled_loss.structured else None
        self.compiled_metrics, self.metric_outputs = _resolve_metrics(metrics, self.loss)
        self.optimizer = build_optimizer(optimizer, self)

    @property
    def compiled(self) -> bool:
        return self.loss is not None and self.optimizer is not None

    def replicas_agree(self) -> None:
        """Give every replica the chief's parameters and buffers, once (a collective: every
        replica calls it, as ``compile``, ``fit``, ``evaluate`` and ``predict`` do), so a model
        built in a multi-replica scope is one model before training wraps it."""
        strategy = self.distribute_strategy
        if self.runtime.replicas_synced or strategy.num_replicas_in_sync == 1:
            return
        state = [*self.parameters(), *self.buffers()]
        if any(nn.parameter.is_lazy(t) for t in state):
            return  # lazy layers have no values yet; the training wrapper broadcasts them later
        strategy.broadcast_tensors(state)
        self.runtime.replicas_synced = True

    # -- training and inference ---------------------------------------------------------
    def fit(self, x: Any, y: Any = None, *, batch_size: int = 32, epochs: int = 1, verbose: int = 1,
            callbacks: Sequence[Callback] | None = None, validation_split: float = 0.0,
            validation_data: Any = None, shuffle: bool = True,
            class_weight: Mapping[int, float] | None = None, sample_weight: Any = None,
            initial_epoch: int | None = None, steps_per_epoch: int | None = None,
            validation_steps: int | None = None, validation_freq: int = 1) -> History:
        """Train for ``epochs`` passes over a dataset of ``(inputs, labels)`` batches.

        Under a multi-replica strategy each global batch is split across replicas and the
        gradients averaged, so the result matches one replica on the whole batch.

        Args:
            x: Batches of ``(inputs, labels)`` or ``(inputs, labels, sample_weights)``: a
                `Dataset` (or distributed dataset), a ``torch.utils.data.DataLoader``, a torch
                map-style or iterable dataset (batched with ``batch_size``), a generator; or
                input tensors / numpy arrays (a tuple or dict of them for several inputs).
            y: Labels when ``x`` holds arrays.
            batch_size: Batch size for arrays and torch datasets.
            epochs: Train until this many epochs are done in all: ``model.epoch + epochs``,
                or ``epochs`` itself when ``initial_epoch`` is given (as Keras).
            verbose: 1 shows a progress bar on the chief replica; 0 is silent.
            callbacks: Extra `Callback` objects.
            validation_split: For arrays: the last fraction held out as validation data.
            validation_data: Data evaluated after each epoch (``val_`` metrics): anything ``x``
                accepts, or an ``(x_val, y_val)`` tuple of arrays.
            shuffle: Shuffle arrays and torch map-style datasets each epoch.
            class_weight: ``{class: weight}`` scaling each example's loss by its label's weight.
            sample_weight: One weight per example of the arrays.
            initial_epoch: The epoch to start from (Keras' meaning: ``epochs`` is then the last).
            steps_per_epoch: Batches per epoch; the data is read on across epochs (a new pass
                starts when it runs out), so a generator that never ends can be trained on.
            validation_steps: Batches of ``validation_data`` per evaluation.
            validation_freq: Evaluate the validation data every this many epochs.

        Returns:
            A `History` whose ``history`` maps metric names to per-epoch values.

        Raises:
            RuntimeError: the model was not compiled. TypeError/ValueError: the data's
            structure, dtypes or shapes do not fit the model or the loss (message says which).
        """
        if not self.compiled:
            raise RuntimeError("Call model.compile(optimizer=..., loss=...) before fit().")
        if validation_split:
            if validation_data is not None:
                raise ValueError("Pass validation_split= or validation_data=, not both.")
            (x, y, sample_weight), validation_data = split_validation(x, y, sample_weight, validation_split)
        if isinstance(validation_data, tuple) and len(validation_data) in (2, 3) and is_arrays(validation_data[0]):
            validation_data = as_dataset(*validation_data[:2], batch_size=batch_size,
                                         sample_weight=validation_data[2] if len(validation_data) == 3 else None)
        elif validation_data is not None:
            validation_data = as_dataset(validation_data, batch_size=batch_size)
        plan = loop.FitPlan(epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                            validation_steps=validation_steps, validation_freq=validation_freq,
                            class_weight=dict(class_weight) if class_weight else None)
        data = as_dataset(x, y, sample_weight=sample_weight, batch_size=batch_size, shuffle=shuffle)
        return self.distribute_strategy.call_on_replicas(
            loop.fit, self, data, plan, validation_data=validation_data,
            callbacks=list(callbacks or []), verbose=verbose)

    def evaluate(self, x: Any, y: Any = None, *, batch_size: int = 32, verbose: int = 1,
                 sample_weight: Any = None, steps: int | None = None,
                 return_dict: bool = False) -> list[float] | dict[str, float]:
        """Loss and metrics over the data (any input `fit` takes), merged across replicas:
        ``[loss, *metrics]``, or a dict with ``return_dict=True``."""
        if self.loss is None:
            raise RuntimeError("Call model.compile(...) before evaluate(); it needs a loss.")
        data = as_dataset(x, y, sample_weight=sample_weight, batch_size=batch_size)
        logs = self.distribute_strategy.call_on_replicas(loop.evaluate, self, data, verbose=verbose,
                                                         steps=steps)
        return logs if return_dict else list(logs.values())

    def predict(self, x: Any, *, batch_size: int = 32, steps: int | None = None) -> Any:
        """Outputs for every input, in order, gathered from all replicas (a dict or tuple of
        tensors for a model with several outputs)."""
        return self.distribute_strategy.call_on_replicas(
            loop.predict, self, as_dataset(x, None, batch_size=batch_size), steps=steps)

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

    def save_weights(self, path: str) -> None:
        """Write the weights alone as one safetensors file (Keras' ``save_weights``)."""
        from .weights import save_weights

        save_weights(self, path)

    def load_weights(self, path: str) -> None:
        """Read a `save_weights` file into this model; names, shapes and dtypes must match."""
        from .weights import load_weights

        load_weights(self, path)

    def train_module(self) -> nn.Module:
        """The module a training step calls: this model, or its data-parallel wrapper."""
        if self.runtime.train_module is None:
            self.runtime.train_module = self.distribute_strategy.prepare_for_training(self)
        return self.runtime.train_module


LossLike = str | Loss | nn.Module | Callable


def _per_output(value: Mapping | Sequence, resolve: Callable) -> dict[Key, Any]:
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    return {key: resolve(item) for key, item in items}


def _resolve_metrics(metrics: Any, loss: Loss | dict[Key, Loss]) -> tuple[list[Metric], list[Key | None]]:
    """Metrics resolved against their output's loss; with several outputs each is named
    ``{output}_{metric}`` and remembers its output."""
    if not isinstance(loss, dict):
        if isinstance(metrics, Mapping):
            raise ValueError("compile() got metrics per output (a dict) but one loss. Give a list "
                             "of metrics, or a loss per output.")
        return [resolve_metric(m, loss) for m in (metrics or [])], [None] * len(metrics or [])
    per_output = (_per_output(metrics, lambda ms: list(ms)) if isinstance(metrics, Mapping)
                  else {key: list(metrics or []) for key in loss})
    unknown = [k for k in per_output if k not in loss]
    if unknown:
        raise ValueError(f"compile() got metrics for outputs {unknown} that have no loss; outputs "
                         f"with a loss: {list(loss)}.")
    resolved, outputs = [], []
    for key, names in per_output.items():
        for metric in names:
            one = resolve_metric(metric, loss[key])
            if not one.name.startswith(f"{output_name(key)}_"):
                one.name = f"{output_name(key)}_{one.name}"
            resolved.append(one)
            outputs.append(key)
    return resolved, outputs


def _input_tensors(args: tuple) -> list[torch.Tensor] | None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return tensors if tensors and len(tensors) == len(args) else None


def _check_inputs(model: Model, args: tuple) -> None:
    tensors = _input_tensors(args)
    if tensors is None or model.input_spec is None:
        return
    if len(tensors) != len(model.input_spec) or not all(
            s.matches(t) for s, t in zip(model.input_spec, tensors)):
        expected = ", ".join(s.describe() for s in model.input_spec)
        received = ", ".join(describe_tensor(t) for t in tensors)
        raise ValueError(
            f"{type(model).__name__} expects inputs ({expected}), the input spec given when it "
            f"was built or recorded from its first successful call. Received: ({received}). Fix "
            "the inputs (e.g. map images to float32 with the right shape); or, if the recorded "
            "spec is the mistake, reset it with model.input_spec = None (or build the model with "
            "input_spec=...)."
        )


def _record_inputs(model: Model, args: tuple, output: Any) -> None:
    """Learn the input spec from the first call that succeeded (a failing call records nothing)."""
    tensors = _input_tensors(args)
    if tensors is None or model.input_spec is not None:
        return
    names = ["x"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
    model.input_spec = [TensorSpec.from_tensor(t, n) for t, n in zip(tensors, names)]


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
