"""Classes and functions a user allows artifacts to rebuild, by registered name only.

Loading never imports a name read from a file: a class is rebuilt only if it is a built-in
on the allowlist or was registered here by the user's own code.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["register_serializable", "registered", "registered_name", "captured_config"]

T = TypeVar("T")
_BY_NAME: dict[str, Any] = {}
_CONFIG_ATTR = "_distsave_config"


def register_serializable(package: str = "Custom", name: str | None = None) -> Callable[[T], T]:
    """Let ``load_model`` rebuild this class (or call this function) by its registered name.

    For a class, the arguments each instance was constructed with are recorded, so the class
    must accept them again (JSON values, or nn.Modules, which are recorded as their own spec).
    A class may instead define ``get_config()`` returning its constructor keyword arguments.

    Args:
        package: A namespace, to keep names from different projects apart.
        name: The name to record; default: the class or function's ``__name__``.

    Example:
        >>> @register_serializable()
        ... class Scale(torch.nn.Module):
        ...     def __init__(self, factor: float = 2.0):
        ...         super().__init__()
        ...         self.factor = factor
    """
    def decorate(obj: T) -> T:
        key = f"{package}>{name or obj.__name__}"
        if key in _BY_NAME and _BY_NAME[key] is not obj:
            qualname = f"{_BY_NAME[key].__module__}.{_BY_NAME[key].__qualname__}"
            raise ValueError(f"{key!r} is already registered for {qualname}. Pass name= to register "
                             "this one under another name.")
        _BY_NAME[key] = obj
        obj._distsave_registered_name = key
        if inspect.isclass(obj):
            _capture_init_arguments(obj)
        return obj
    return decorate


def _capture_init_arguments(cls: type) -> None:
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        original(self, *args, **kwargs)
        if type(self) is cls:  # a registered subclass records its own arguments
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))
            for pname, param in signature.parameters.items():
                if param.kind is param.VAR_KEYWORD and pname in arguments:
                    arguments.update(arguments.pop(pname))
                elif param.kind is param.VAR_POSITIONAL and pname in arguments:
                    raise TypeError(f"{cls.__name__} takes *{pname}; registered classes need "
                                    "named constructor arguments, or a get_config() method.")
            object.__setattr__(self, _CONFIG_ATTR, arguments)

    cls.__init__ = __init__


def registered(name: str) -> Any | None:
    """The class or function registered under ``name``, or None."""
    return _BY_NAME.get(name)


def built_class(obj: Any) -> type:
    """The class ``obj`` was built as, seen through the subclass FSDP2's ``fully_shard`` swaps in
    (``FSDPLinear`` for ``Linear``), so a sharded model records the same architecture."""
    cls = type(obj)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded unless it was imported
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        return next(base for base in cls.__bases__ if not issubclass(base, fsdp.FSDPModule))
    return cls


def registered_name(obj: Any) -> str | None:
    """The name ``obj``'s class (or ``obj`` itself, for a function) was registered under."""
    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else built_class(obj)
    name = target.__dict__.get("_distsave_registered_name")
    return name if name is not None and _BY_NAME.get(name) is target else None


def captured_config(obj: Any) -> dict[str, Any]:
    """Constructor arguments of a registered instance (``get_config()`` wins if defined)."""
    if callable(getattr(obj, "get_config", None)) and "get_config" in _own_methods(built_class(obj)):
        return dict(obj.get_config())
    return dict(getattr(obj, _CONFIG_ATTR, {}))


def _own_methods(cls: type) -> set[str]:
    from torch import nn

    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("distsave."):
            continue
        names.update(vars(klass))
    return names
