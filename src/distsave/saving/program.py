"""Code-free programs: a ``torch.export`` graph as JSON, weights kept apart in safetensors.

Writing exports on the CPU, decomposes to core ATen and strips source metadata. Reading
checks the JSON before torch sees it: every operator must be on the allowlist (core ATen plus
the few shape builtins export emits), symbolic expressions may only be arithmetic on shape
symbols, and nothing that torch would compile or unpickle (guard code, custom objects) is
accepted. ``torch.export.load`` and pickle are never used.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch._export.serde import serialize as serde

from .errors import ArtifactError, SaveError

__all__ = ["export_program", "check_program", "build_program"]

_BUILTIN_TARGETS = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.pow", "_operator.eq",
    "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge",
    "math.ceil", "math.floor", "math.trunc", "torch.sym_max", "torch.sym_min", "torch.sym_int",
    "torch.sym_float", "torch.sym_not",
})
_SHAPE_OPS = frozenset({
    "sym_size.int", "sym_stride.int", "sym_numel.default", "sym_storage_offset.default",
    "_assert_scalar.default", "_assert_tensor_metadata.default", "sym_constrain_range.default",
    "sym_constrain_range_for_size.default", "view.default", "alias.default",
})
_SYMPY_NAMES = frozenset({
    "FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "Max", "Min", "ModularIndexing", "Where",
    "CeilToInt", "FloorToInt", "PowByNatural", "TruncToInt", "IntTrueDiv", "oo", "True", "False",
    "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "positive", "negative", "nonnegative",
    "integer", "real", "finite", "infinite", "zero", "nonzero", "even", "odd",
})
_QUOTED_SYMBOL = re.compile(r"'[a-z]\d+'")
_EXPRESSION = re.compile(r"^[A-Za-z0-9_+\-*/%(),. <>=!]*$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"^[a-z]\d+$")
# Where torch's serializer can skip pickling the tensors we store apart (torch >= 2.12), skip it;
# older versions pickle them into bytes that are dropped unread.
_SKIP_TENSOR_PAYLOADS = {name: False for name in ("serialize_state_dict", "serialize_constants",
                                                   "serialize_example_inputs")
                         if name in inspect.signature(serde.serialize).parameters}
_ATEN = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")


@functools.cache
def operator_allowed(target: str) -> bool:
    """Whether a graph may call ``target``: core ATen, shape ops, or a shape builtin."""
    if target in _BUILTIN_TARGETS:
        return True
    match = _ATEN.match(target)
    if match is None:
        return False
    name, overload = match.groups()
    if f"{name}.{overload}" in _SHAPE_OPS:
        return True
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, overload, None) if packet is not None else None
    return op is not None and torch.Tag.core in getattr(op, "tags", ())


def _dicts(value: Any):
    """Every JSON object inside ``value``, depth first."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)


def _expression_ok(text: Any) -> bool:
    """Plain arithmetic on shape symbols (sympy's repr form allowed), nothing callable else."""
    if not isinstance(text, str):
        return False
    text = _QUOTED_SYMBOL.sub("s0", text)
    if not _EXPRESSION.match(text) or "__" in text:
        return False
    return all(_SYMBOL.match(w) or w in _SYMPY_NAMES for w in _IDENTIFIER.findall(text))


def check_program(program: dict[str, Any], where: str) -> list[str]:
    """Every reason the JSON program must not be run; empty when it is safe to build."""
    problems = []
    if program.get("guards_code"):
        problems.append("it carries guard code, which torch would compile and run")
    graph = program.get("graph_module", {}).get("graph", {})
    if graph.get("custom_obj_values"):
        problems.append("it holds custom (script) objects")
    for key in program.get("range_constraints", {}):
        if not _expression_ok(key):
            problems.append(f"symbolic expression {key!r} is not plain shape arithmetic")
    for obj in _dicts(program):
        target = obj.get("target")
        if "target" in obj and "inputs" in obj and "outputs" in obj and not (isinstance(target, str) and operator_allowed(target)):
            problems.append(f"operator {target!r} is not on the allowlist (core ATen and shape builtins)")
        if "as_operator" in obj and not (isinstance(obj["as_operator"], str)
                                         and operator_allowed(obj["as_operator"])):
            problems.append(f"operator argument {obj['as_operator']!r} is not on the allowlist")
        if "expr_str" in obj and not _expression_ok(obj["expr_str"]):
            problems.append(f"symbolic expression {obj['expr_str']!r} is not plain shape arithmetic")
        if obj.get("as_custom_obj") or obj.get("custom_obj"):
            problems.append("it refers to a custom (script) object")
    return [f"{where}: {p}" for p in dict.fromkeys(problems)]


_DEVICE_ASSERT = "torch.ops.aten._assert_tensor_metadata.default"


def _strip(program: dict[str, Any]) -> dict[str, Any]:
    """Drop what running does not need: source metadata (stack traces, module paths: private)
    and input metadata asserts, which pin the device of the export and break portability
    (signatures check their inputs' dtype and shape themselves)."""
    for obj in list(_dicts(program)):
        if isinstance(obj.get("nodes"), list):
            obj["nodes"] = [n for n in obj["nodes"] if n.get("target") != _DEVICE_ASSERT]
        if "target" in obj and "inputs" in obj and "outputs" in obj:
            obj["metadata"] = {}
    program["guards_code"] = []
    return program


def export_program(module: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                   dynamic_shapes: tuple[dict[int, Any], ...],
                   where: str) -> tuple[dict[str, Any], list[str], dict[str, torch.Tensor]]:
    """Export ``module`` (on the CPU, in eval mode) to a JSON program.

    Returns:
        The program JSON; the names of the program's parameters and buffers (``module``'s
        state-dict names); and the program's own tensor constants.

    Raises:
        SaveError: the module cannot be exported with these inputs, or it calls an operator
            that could not be loaded again.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation notices
            exported = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes)
            exported = exported.run_decompositions()
    except Exception as error:  # export's many failure types all mean "cannot record a program"
        raise SaveError(f"Could not export {where} with torch.export: {error}\nGive an input_spec "
                        "whose open dimensions the model accepts, or a signature without "
                        "data-dependent Python control flow.") from error
    constants = {}
    for name, value in exported.constants.items():
        if not isinstance(value, torch.Tensor):
            raise SaveError(f"{where} holds a non-tensor constant {name!r} ({type(value).__name__}); "
                            "only tensors can be stored without pickle.")
        constants[name] = value
    artifact = serde.serialize(exported, **_SKIP_TENSOR_PAYLOADS)
    program = _strip(json.loads(artifact.exported_program))
    problems = check_program(program, where)
    if problems:
        raise SaveError("The exported program could not be loaded safely again: " + "; ".join(problems))
    return program, list(exported.state_dict), constants


def build_program(program: dict[str, Any], state: dict[str, torch.Tensor],
                  constants: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Turn a checked JSON program and its tensors into a callable module.

    Raises:
        ArtifactError: the program fails `check_program`, or torch cannot rebuild it.
    """
    problems = check_program(program, where)
    if problems:
        raise ArtifactError("Refusing to load a program: " + "; ".join(problems))
    program = _strip(program)
    parameters = {spec["parameter"]["parameter_name"]
                  for spec in program.get("graph_module", {}).get("signature", {}).get("input_specs", [])
                  if isinstance(spec, dict) and "parameter" in spec}
    # Fresh (aligned) copies: BLAS may sum in another order on unaligned memory at batch 1.
    # Parameters start frozen (serving needs no gradients); SavedModelLayer may unfreeze them.
    state = {k: nn.Parameter(v.clone(), requires_grad=False) if k in parameters
             else v.clone() for k, v in state.items()}
    try:
        artifact = serde.SerializedArtifact(json.dumps(program).encode(), state,
                                            dict(constants), b"")
        return serde.deserialize(artifact).module()
    except Exception as error:  # any failure to rebuild is a broken artifact
        raise ArtifactError(f"Could not rebuild the program {where}: {error}") from error
