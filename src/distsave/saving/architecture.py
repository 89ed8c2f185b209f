"""Architecture as JSON: built-in ``torch.nn`` layers by constructor arguments, user classes
by registered name. Rebuilding looks names up in the allowlist and the registry, never imports.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

from torch import nn

from ..training.model import Model, Sequential
from .errors import ArtifactError, SaveError
from .registry import built_class, captured_config, registered, registered_name

__all__ = ["ALLOWED_LAYERS", "build_module", "module_spec", "to_json_value", "from_json_value"]

_LAYER_NAMES = """
Sequential ModuleList ModuleDict
Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d
LazyConv1d LazyConv2d LazyConv3d
Linear LazyLinear Bilinear Identity
ReLU ReLU6 LeakyReLU PReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Softmax LogSoftmax Softmin
Softplus Softsign Hardtanh Hardswish Hardsigmoid Tanhshrink Softshrink Hardshrink Threshold GLU
MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d LPPool1d LPPool2d
AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d
AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d
BatchNorm1d BatchNorm2d BatchNorm3d LazyBatchNorm1d LazyBatchNorm2d LazyBatchNorm3d
LayerNorm GroupNorm RMSNorm InstanceNorm1d InstanceNorm2d InstanceNorm3d LocalResponseNorm
Dropout Dropout1d Dropout2d Dropout3d AlphaDropout
Flatten Unflatten Upsample PixelShuffle PixelUnshuffle
ZeroPad1d ZeroPad2d ConstantPad1d ConstantPad2d ReflectionPad1d ReflectionPad2d ReplicationPad2d
Embedding RNN LSTM GRU
CrossEntropyLoss NLLLoss MSELoss L1Loss BCELoss BCEWithLogitsLoss SmoothL1Loss HuberLoss KLDivLoss
"""
ALLOWED_LAYERS: dict[str, type[nn.Module]] = {
    name: getattr(nn, name) for name in _LAYER_NAMES.split() if hasattr(nn, name)
}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SKIPPED_ARGS = {"self", "device", "dtype"}


def to_json_value(value: Any, where: str) -> Any:
    """A constructor argument as JSON; nn.Modules become their spec."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [to_json_value(v, where) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: to_json_value(v, where) for k, v in value.items()}}
    if isinstance(value, nn.Module):
        return {"module": module_spec(value, where)}
    raise SaveError(f"Cannot record {where} = {value!r} ({type(value).__name__}): constructor "
                    "arguments must be JSON values, tuples, lists, dicts or nn.Modules. Give the "
                    "class a get_config() that returns such values.")


def from_json_value(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [from_json_value(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tuple"}:
            return tuple(from_json_value(v, where) for v in value["tuple"])
        if set(value) == {"dict"}:
            return {k: from_json_value(v, where) for k, v in value["dict"].items()}
        if set(value) == {"module"}:
            return build_module(value["module"], where)
        raise ArtifactError(f"Unexpected value {value!r} at {where} in the architecture.")
    return value


def _constructor_parameters(cls: type[nn.Module]) -> list[inspect.Parameter]:
    """The named constructor arguments of an allowed layer class. The recurrent layers take
    ``*args, **kwargs`` and hand them to ``nn.RNNBase``, which the class gives its ``mode``;
    ``proj_size`` is LSTM's alone and ``nonlinearity`` RNN's alone."""
    if cls in (nn.RNN, nn.LSTM, nn.GRU):
        base = inspect.signature(nn.RNNBase.__init__).parameters.values()
        own = [p for p in base if p.name != "mode" and (p.name != "proj_size" or cls is nn.LSTM)]
        if cls is nn.RNN:
            own.append(inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh"))
        return own
    return list(inspect.signature(cls.__init__).parameters.values())


def _builtin_config(module: nn.Module, where: str) -> dict[str, Any]:
    config = {}
    for param in _constructor_parameters(built_class(module)):
        name = param.name
        if name in _SKIPPED_ARGS or name.startswith("_") or param.kind in (param.VAR_POSITIONAL,
                                                                           param.VAR_KEYWORD):
            continue
        if not hasattr(module, name):
            if param.default is param.empty:
                raise SaveError(f"Cannot record {built_class(module).__name__} at {where}: argument {name!r} "
                                "is not readable from the layer. Wrap it in a registered class.")
            continue
        value = getattr(module, name)
        if isinstance(param.default, bool) and (value is None or isinstance(value, nn.Parameter)):
            value = value is not None  # e.g. bias=True is stored as the bias Parameter
        config[name] = to_json_value(value, f"{where}.{name}")
    return config


def module_spec(module: nn.Module, where: str = "model") -> dict[str, Any]:
    """The JSON spec that `build_module` turns back into an equivalent, untrained module.

    Raises:
        SaveError: the module (or a layer inside) is neither an allowed built-in nor registered.
    """
    cls = built_class(module)
    name = registered_name(module)
    if name is not None:
        return {"class": name, "config": {k: to_json_value(v, f"{where}.{k}")
                                          for k, v in captured_config(module).items()}}
    if cls is Sequential:
        return {"class": "distsave.Sequential",
                "layers": [module_spec(m, f"{where}.{i}") for i, m in module._modules.items()]}
    if cls is Model:
        return {"class": "distsave.Model", "network": module_spec(module.network, f"{where}.network")}
    special = getattr(module, "distsave_spec", None)
    if callable(special):
        return special()
    if ALLOWED_LAYERS.get(cls.__name__) is cls:
        if isinstance(module, _CONTAINERS):
            return {"class": f"torch.nn.{cls.__name__}",
                    "children": {k: module_spec(m, f"{where}.{k}") for k, m in module._modules.items()}}
        return {"class": f"torch.nn.{cls.__name__}", "config": _builtin_config(module, where)}
    raise SaveError(
        f"Cannot save the architecture of {cls.__module__}.{cls.__qualname__} at {where}: it is "
        "not a built-in torch.nn layer on distsave's allowlist and is not registered. Decorate "
        "the class with @distsave.register_serializable() (its constructor arguments are "
        "recorded), or save weights and signatures only with distsave.saved_model.save."
    )


_SPECIAL_BUILDERS: dict[str, Any] = {}


def register_special(class_name: str, builder: Any) -> None:
    """Let a distsave layer with its own spec (SavedModelLayer) be rebuilt by ``class_name``."""
    _SPECIAL_BUILDERS[class_name] = builder


def has_special_builder(class_name: str) -> bool:
    """Whether ``class_name`` is rebuilt by a distsave layer's own builder (from its artifact)."""
    return class_name in _SPECIAL_BUILDERS


def build_module(spec: Any, where: str = "model", context: Any = None) -> nn.Module:
    """Rebuild a module from its spec; unknown class names raise `ArtifactError`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise ArtifactError(f"Expected a layer spec with a 'class' at {where} in the architecture. "
                            f"Received: {spec!r}.")
    name = spec["class"]
    if name == "distsave.Sequential":
        return Sequential([build_module(s, f"{where}.{i}", context) for i, s in enumerate(spec["layers"])])
    if name == "distsave.Model":
        return Model(build_module(spec["network"], f"{where}.network", context))
    if name in _SPECIAL_BUILDERS:
        return _SPECIAL_BUILDERS[name](spec, context)
    if name.startswith("torch.nn."):
        cls = ALLOWED_LAYERS.get(name.removeprefix("torch.nn."))
        if cls is None:
            raise ArtifactError(f"Layer class {name!r} at {where} is not on distsave's allowlist of "
                                "torch.nn layers; the artifact cannot be rebuilt safely.")
        if "children" in spec:
            children = {k: build_module(s, f"{where}.{k}", context) for k, s in spec["children"].items()}
            if cls is nn.ModuleDict:
                return cls(children)
            if cls is nn.ModuleList:
                return cls(children.values())
            return cls(OrderedDict(children))
        return cls(**_config_args(spec, where))
    cls = registered(name)
    if cls is None or not inspect.isclass(cls):
        raise ArtifactError(
            f"Unknown class {name!r} at {where} in the saved architecture. Register it before "
            f"loading: decorate the class with @distsave.register_serializable("
            f"package={name.split('>')[0]!r}) and import the module that defines it."
        )
    return cls(**_config_args(spec, where))


def _config_args(spec: dict[str, Any], where: str) -> dict[str, Any]:
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise ArtifactError(f"Expected a config object at {where}. Received: {config!r}.")
    return {k: from_json_value(v, f"{where}.{k}") for k, v in config.items()}
