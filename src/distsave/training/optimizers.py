"""Optimizers by name, class, factory or instance, recorded as class name + hyperparameters."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizer", "optimizer_class", "optimizer_config", "without_dynamo_import"]

BY_NAME: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "sgd": (torch.optim.SGD, {"lr": 0.01}),  # Keras' default; torch's is 1e-3
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.001}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.001}),
    "adamax": (torch.optim.Adamax, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
    "adadelta": (torch.optim.Adadelta, {}),
}
OptimizerLike = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer


def build_optimizer(spec: OptimizerLike, module: nn.Module) -> torch.optim.Optimizer:
    """Make an optimizer over ``module``'s trainable parameters from a name, class or factory."""
    params = [p for p in module.parameters() if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        mine = {id(p) for p in module.parameters()}
        theirs = [p for group in spec.param_groups for p in group["params"]]
        if any(id(p) not in mine for p in theirs):
            raise ValueError("The optimizer instance holds parameters that are not this model's. "
                             "Build it over model.parameters(), or pass its class or name instead.")
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key not in BY_NAME:
            raise ValueError(f"Unknown optimizer {spec!r}. Known names: {sorted(BY_NAME)}; or pass a "
                             "torch.optim class such as torch.optim.Adam, or a factory.")
        cls, defaults = BY_NAME[key]
        return cls(params, **defaults)
    if callable(spec):
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"The optimizer factory returned {type(optimizer).__name__}; expected a "
                            "torch.optim.Optimizer.")
        return optimizer
    raise TypeError(f"Expected an optimizer name, a torch.optim class, a factory or an instance. "
                    f"Received: {spec!r}.")


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def optimizer_config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class name and hyperparameters (``defaults``) of an optimizer, as JSON."""
    return {"class": type(optimizer).__name__,
            "defaults": {k: jsonable(v) for k, v in optimizer.defaults.items()}}


@functools.cache
def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    return {name: cls for name, cls in vars(torch.optim).items()
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Resolve a recorded torch.optim class by name (never by import)."""
    cls = _torch_optimizers().get(name)
    if cls is None:
        raise ValueError(f"Unknown optimizer class {name!r}. Built-ins come from torch.optim; "
                         "register custom ones with @distsave.register_serializable().")
    return cls


def tuples_back(defaults: dict[str, Any], reference: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """JSON turned tuples into lists; give tuple-valued hyperparameters (betas) their type back."""
    ref = dict(reference)
    return {k: tuple(v) if isinstance(ref.get(k), tuple) and isinstance(v, list) else v
            for k, v in defaults.items()}


# The Optimizer methods torch wraps in `torch._disable_dynamo` that building an optimizer and
# restoring its state call.
_DYNAMO_DISABLED = ("add_param_group", "state_dict", "load_state_dict")


@contextlib.contextmanager
def without_dynamo_import() -> Iterator[None]:
    """Build optimizers and move their state without importing ``torch._dynamo``.

    torch wraps those `Optimizer` methods in ``torch._disable_dynamo``, which imports
    torch._dynamo on the first call (1-5 s, the larger part of loading a checkpoint in a fresh
    process) only to mark them as not to be traced. Until torch._dynamo is imported nothing can
    be traced, so meanwhile the wrapper is handed the plain method (it looks for it in the
    ``__dynamo_disable`` attribute it caches); the attribute is removed afterwards, so the
    first call after this imports as before.
    """
    if "torch._dynamo" in sys.modules:
        yield
        return
    handed = []
    for name in _DYNAMO_DISABLED:
        plain = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if plain is not None and getattr(plain, "__dynamo_disable", None) is None:
            setattr(plain, "__dynamo_disable", plain)
            handed.append(plain)
    try:
        yield
    finally:
        for plain in handed:
            if getattr(plain, "__dynamo_disable", None) is plain:
                delattr(plain, "__dynamo_disable")
