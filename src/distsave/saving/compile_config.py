"""Compile settings and optimizer state as JSON + tensors, so a loaded model trains on."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..training import losses as losses_module
from ..training import metrics as metrics_module
from ..training.losses import FunctionLoss, Loss, ModuleLoss
from ..training.model import Model
from ..training.optimizers import jsonable, optimizer_class, optimizer_config, tuples_back, without_dynamo_import
from .architecture import build_module, module_spec
from .errors import ArtifactError, SaveError
from .registry import captured_config, registered, registered_name

__all__ = ["compile_to_json", "optimizer_state", "restore_compile"]

_BUILTIN_LOSSES = {cls.__name__: cls for cls in vars(losses_module).values()
                   if isinstance(cls, type) and issubclass(cls, Loss)
                   and cls not in (Loss, ModuleLoss, FunctionLoss)}


def _loss_to_json(loss: Loss) -> dict[str, Any]:
    if isinstance(loss, ModuleLoss):
        return {"kind": "module", "spec": module_spec(loss.module, "loss")}
    if isinstance(loss, FunctionLoss):
        name = registered_name(loss.fn)
        if name is None:
            raise SaveError(f"Cannot save the loss function {loss.fn!r}: it is not registered. Decorate "
                            "it with @distsave.register_serializable(), or compile with a loss name.")
        return {"kind": "function", "name": name}
    name = registered_name(loss)
    if name is not None:
        return {"kind": "registered", "name": name, "config": captured_config(loss)}
    if _BUILTIN_LOSSES.get(type(loss).__name__) is type(loss):
        return {"kind": "distsave", "class": type(loss).__name__, "config": loss.get_config()}
    raise SaveError(f"Cannot save the loss {type(loss).__qualname__}: register it with "
                    "@distsave.register_serializable().")


def _loss_from_json(data: dict[str, Any]) -> Loss:
    kind = data.get("kind")
    if kind == "module":
        return ModuleLoss(build_module(data["spec"], "loss"))
    if kind == "function":
        fn = registered(data["name"])
        if fn is None:
            raise ArtifactError(f"The saved loss function {data['name']!r} is not registered here. "
                                "Import the module that defines it (decorated with "
                                "@distsave.register_serializable()) before loading.")
        return FunctionLoss(fn)
    if kind == "registered":
        cls = registered(data["name"])
        if cls is None:
            raise ArtifactError(f"The saved loss class {data['name']!r} is not registered here.")
        return cls(**data.get("config", {}))
    if kind == "distsave" and data.get("class") in _BUILTIN_LOSSES:
        return _BUILTIN_LOSSES[data["class"]](**data.get("config", {}))
    raise ArtifactError(f"Unknown loss entry in the manifest: {data!r}.")


def _losses_to_json(model: Model) -> dict[str, Any]:
    """One loss as before; per-output losses as ``{"kind": "per_output", "outputs": {key: loss},
    "weights": {key: w}}`` (tuple positions as ``"0"``, ``"1"``… with ``"positional": true``)."""
    if not isinstance(model.loss, dict):
        return _loss_to_json(model.loss)
    positional = all(isinstance(k, int) for k in model.loss)
    return {"kind": "per_output", "positional": positional,
            "outputs": {str(k): _loss_to_json(v) for k, v in model.loss.items()},
            "weights": {str(k): w for k, w in (model.loss_weights or {}).items()}}


def _losses_from_json(data: dict[str, Any]) -> tuple[Any, dict[Any, float] | None]:
    if data.get("kind") != "per_output":
        return _loss_from_json(data), None
    outputs, weights = data.get("outputs"), data.get("weights", {})
    if not isinstance(outputs, dict) or not outputs or not isinstance(weights, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights.values()):
        raise ArtifactError(f"Malformed per-output loss entry in the manifest: {data!r}.")
    key = _positional_key if data.get("positional") is True else str
    return ({key(k): _loss_from_json(v) for k, v in outputs.items()},
            {key(k): float(w) for k, w in weights.items()} or None)


def _positional_key(text: str) -> int:
    if not text.isdigit():
        raise ArtifactError(f"A positional output key must be a number. Received: {text!r}.")
    return int(text)


def _parameter_names(model: Model) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def compile_to_json(model: Model) -> dict[str, Any] | None:
    """Loss, metrics and optimizer (class, hyperparameters, param groups by name)."""
    if not model.compiled:
        return None
    names = _parameter_names(model)
    groups = []
    for group in model.optimizer.param_groups:
        hyper = optimizer_config(model.optimizer)["defaults"] | {
            k: jsonable(v) for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [names[id(p)] for p in group["params"]]})
    metrics = []
    for metric, output in zip(model.compiled_metrics, model.metric_outputs):
        if metrics_module.CLASSES.get(type(metric).__name__) is not type(metric):
            raise SaveError(f"Cannot save the metric {type(metric).__qualname__}; use a built-in metric.")
        entry = {"class": type(metric).__name__, "config": metric.get_config()}
        metrics.append(entry if output is None else {**entry, "output": str(output)})
    optimizer = {**optimizer_config(model.optimizer), "param_groups": groups}
    optimizer["class"] = registered_name(model.optimizer) or optimizer["class"]
    return {"loss": _losses_to_json(model), "metrics": metrics, "optimizer": optimizer,
            "precision": model.precision.name}


def optimizer_state(model: Model) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Per-parameter optimizer state: tensors ``"{param}/{key}"``, and non-tensor values."""
    names = _parameter_names(model)
    tensors, scalars = {}, {}
    for param, state in model.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[id(param)]}/{key}"] = value
            else:
                scalars.setdefault(names[id(param)], {})[key] = value
    return tensors, scalars


def restore_compile(model: Model, config: dict[str, Any], state_tensors: dict[str, torch.Tensor],
                    state_scalars: dict[str, dict[str, Any]]) -> None:
    """Compile ``model`` as recorded and put the optimizer's state back."""
    loss, loss_weights = _losses_from_json(config["loss"])
    metrics: list | dict = [] if not isinstance(loss, dict) else {key: [] for key in loss}
    for entry in config.get("metrics", []):
        cls = metrics_module.CLASSES.get(entry.get("class"))
        if cls is None:
            raise ArtifactError(f"Unknown metric class {entry.get('class')!r} in the manifest.")
        metric = cls(**entry.get("config", {}))
        if isinstance(metrics, dict):
            output = next((k for k in metrics if str(k) == entry.get("output")), None)
            if output is None:
                raise ArtifactError(f"A metric names output {entry.get('output')!r}, which has no "
                                    f"loss; outputs: {list(metrics)}.")
            metrics[output].append(metric)
        else:
            metrics.append(metric)
    opt = config["optimizer"]
    cls = registered(opt["class"]) or optimizer_class(opt["class"])
    params = dict(model.named_parameters())
    accepted = torch_defaults(cls)
    groups = []
    for group in opt["param_groups"]:
        missing = [n for n in group["params"] if n not in params]
        if missing:
            raise ArtifactError(f"The optimizer state names parameters the model lacks: {missing}.")
        groups.append({**tuples_back({k: v for k, v in group.items() if k != "params"}, accepted),
                       "params": [params[n] for n in group["params"]]})
    defaults = tuples_back({k: v for k, v in opt["defaults"].items() if k in accepted}, accepted)
    index = {name: i for i, name in enumerate(n for g in opt["param_groups"] for n in g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in state_tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = tensor
    for name, values in state_scalars.items():
        state.setdefault(index[name], {}).update(values)
    with without_dynamo_import():  # a loaded model that only predicts never needs it
        model.compile(optimizer=lambda _: cls(groups, **defaults), loss=loss, metrics=metrics,
                      loss_weights=loss_weights, precision=config.get("precision", "32"))
        saved = model.optimizer.state_dict()
        model.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def torch_defaults(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not p.empty}
