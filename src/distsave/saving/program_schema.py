"""The JSON program schema, checked strictly before anything is built from a program.

A program is ``torch.export``'s serialized ``ExportedProgram`` (schema version 8). Every key is
known here and every string has a kind: names (identifiers: torch.fx pastes them into Python
source it executes), state paths (dotted identifiers or indices), shape expressions (arithmetic
on shape symbols), operators (the allowlist) or inert text (argument values, kept as data).
Keys this schema does not know, and the parts of torch's schema that carry code or objects
(guard code, custom objects, operator arguments, subgraphs), are refused. The schema has no
recursive type (subgraphs are refused), so the check nests only as deep as the schema,
whatever the depth of the input. Patterns are matched in full (``fullmatch``: a ``$`` would let
a trailing newline through).
"""

from __future__ import annotations

import functools
import keyword
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .format import MAX_NAME_LENGTH

__all__ = ["MAX_ARGUMENT_ITEMS", "MAX_NAME_LENGTH", "MAX_PROGRAM_NODES", "MAX_TENSOR_RANK",
           "check_schema", "name_problem", "operator_allowed", "path_problem", "resolve_operator"]

MAX_PROGRAM_NODES = 20_000
MAX_ARGUMENT_ITEMS = 8 * MAX_PROGRAM_NODES
MAX_TENSOR_RANK = 32
_MAX_SMALL_MAP = 64
_MAX_EXPRESSION_LENGTH = 4096
_MAX_PROBLEMS = 20

BUILTIN_OPERATORS = {
    **{f"_operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne",
        "lt", "le", "gt", "ge")},
    "math.ceil": math.ceil, "math.floor": math.floor, "math.trunc": math.trunc,
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_max", "sym_min", "sym_int", "sym_float", "sym_not")},
}
_SHAPE_OPS = frozenset({
    "sym_size.int", "sym_stride.int", "sym_numel.default", "sym_storage_offset.default",
    "_assert_scalar.default", "_assert_tensor_metadata.default", "sym_constrain_range.default",
    "sym_constrain_range_for_size.default", "view.default", "alias.default",
})
# ATen operators outside the core set that the core decomposition keeps, having none of its own
# (AdaptiveMaxPool1d/2d/3d): pure functions of their tensors, like the core ones.
_UNDECOMPOSED_OPS = frozenset({"adaptive_max_pool2d.default", "adaptive_max_pool3d.default"})
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_SYMPY_NAMES = frozenset({
    "FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "Max", "Min", "ModularIndexing", "Where",
    "CeilToInt", "FloorToInt", "PowByNatural", "TruncToInt", "IntTrueDiv", "oo", "True", "False",
    "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "positive", "negative", "nonnegative",
    "integer", "real", "finite", "infinite", "zero", "nonzero", "even", "odd",
})
_QUOTED_SYMBOL = re.compile(r"'[a-z][0-9]+'")
_EXPRESSION = re.compile(r"[A-Za-z0-9_+\-*/%(),. <>=!]*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # found in text, not matched in full
_SYMBOL = re.compile(r"[a-z][0-9]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"[0-9]{1,9}")
_VERSION = re.compile(r"[A-Za-z0-9.+_-]{1,64}")
_REPEATED_CALL = re.compile(r".+@[0-9]{1,9}")
_DEVICE_TYPE = re.compile(r"[a-z_]{1,16}")
_FLOAT_WORDS = frozenset({"Infinity", "-Infinity", "NaN"})
_INT64 = (-2**63, 2**63)


@functools.cache
def resolve_operator(target: str) -> Any:
    """The callable for an allowed operator name (core ATen, shape ops, shape builtins, the few
    operators the core decomposition keeps), or None."""
    if target in BUILTIN_OPERATORS:
        return BUILTIN_OPERATORS[target]
    match = _ATEN.fullmatch(target)
    if match is None:
        return None
    name, overload = match.groups()
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, overload, None) if packet is not None else None
    if not isinstance(op, torch._ops.OpOverload):
        return None
    if f"{name}.{overload}" in _SHAPE_OPS | _UNDECOMPOSED_OPS or torch.Tag.core in op.tags:
        return op
    return None


def operator_allowed(target: str) -> bool:
    """Whether a graph may call ``target``: core ATen, shape ops, or a shape builtin."""
    return isinstance(target, str) and resolve_operator(target) is not None


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a value/node name: it must be a Python identifier, not a keyword."""
    if not isinstance(value, str):
        return f"expected a name (string), received {type(value).__name__}"
    if len(value) > MAX_NAME_LENGTH:
        return f"name is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    if not _IDENTIFIER.fullmatch(value) or keyword.iskeyword(value):
        return f"{value!r} is not an identifier (letters, digits, '_'; not a Python keyword)"
    return None


@functools.cache
def _reserved_attributes() -> frozenset[str]:
    """Attribute names of the module a program becomes: state may not shadow them."""
    module = fx.GraphModule(torch.nn.Module(), fx.Graph())
    return frozenset(dir(fx.GraphModule)) | frozenset(vars(module))


def path_problem(value: Any, *, root_allowed: bool = False) -> str | None:
    """Why ``value`` cannot be a state or module path: dotted identifiers or indices (``0.weight``)."""
    if root_allowed and value == "":
        return None
    if not isinstance(value, str):
        return f"expected a dotted name (string), received {type(value).__name__}"
    if len(value) > MAX_NAME_LENGTH:
        return f"name is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    for part in value.split("."):
        if _INDEX.fullmatch(part):
            continue
        if not _IDENTIFIER.fullmatch(part) or keyword.iskeyword(part) or part.startswith("__"):
            return (f"{value!r} is not a dotted name (identifiers or indices joined by '.', "
                    "no Python keywords, no '__' prefixes)")
        if part in _reserved_attributes():
            return f"{value!r} uses {part!r}, an attribute of every torch.nn.Module"
    return None


def expression_problem(value: Any) -> str | None:
    """Why ``value`` is not plain arithmetic on shape symbols (sympy's repr form allowed)."""
    if not isinstance(value, str) or len(value) > _MAX_EXPRESSION_LENGTH:
        return f"symbolic expression {value!r} is not plain shape arithmetic"
    text = _QUOTED_SYMBOL.sub("s0", value)
    if (not _EXPRESSION.fullmatch(text) or "__" in text
            or not all(_SYMBOL.fullmatch(w) or w in _SYMPY_NAMES for w in _WORD.findall(text))):
        return f"symbolic expression {value!r} is not plain shape arithmetic"
    return None


def _int_problem(value: Any) -> str | None:
    if type(value) is not int or not _INT64[0] <= value < _INT64[1]:
        return f"expected a 64-bit integer, received {value!r:.60}"
    return None


def _float_problem(value: Any) -> str | None:
    if type(value) in (int, float) or (isinstance(value, str) and value in _FLOAT_WORDS):
        return None
    return f"expected a number, received {value!r:.60}"


def _bool_problem(value: Any) -> str | None:
    return None if type(value) is bool else f"expected true or false, received {value!r:.60}"


def _text_problem(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, received {type(value).__name__}"


def _operator_problem(value: Any) -> str | None:
    if operator_allowed(value):
        return None
    return f"operator {value!r:.200} is not on the allowlist (core ATen and shape builtins)"


def _enum_problem(allowed: frozenset[int]):
    def problem(value: Any) -> str | None:
        if type(value) is int and value in allowed:
            return None
        return f"expected one of {sorted(allowed)}, received {value!r:.60}"
    return problem


@dataclass(frozen=True)
class Leaf:
    """A scalar checked by a function returning the problem or None (looked up by name at check
    time, so a test can switch one check off)."""
    check: Any


@dataclass(frozen=True)
class Struct:
    """An object with these keys (each of a schema type); any other key is refused."""
    required: dict[str, Any]
    optional: dict[str, Any]


@dataclass(frozen=True)
class Union:
    """Exactly one of ``options``, as torch writes its union dataclasses: ``{"as_int": 3}``."""
    options: dict[str, Any]


@dataclass(frozen=True)
class ListOf:
    """A list; ``counted`` lists (arguments and outputs of calls, which each become source text
    or graph nodes) share the program's budget of ``MAX_ARGUMENT_ITEMS``."""
    item: Any
    max_items: int = MAX_PROGRAM_NODES
    counted: bool = False


@dataclass(frozen=True)
class MapOf:
    key: Any
    value: Any
    max_items: int = MAX_PROGRAM_NODES


@dataclass(frozen=True)
class Nullable:
    inner: Any


@dataclass(frozen=True)
class Empty:
    """A field torch fills only with code or objects we never accept; ``reason`` says which."""
    reason: str


NAME = Leaf("name_problem")
PATH = Leaf("path_problem")
MODULE_PATH = Leaf("module_path_problem")
EXPRESSION = Leaf("expression_problem")
INT = Leaf("_int_problem")
FLOAT = Leaf("_float_problem")
BOOL = Leaf("_bool_problem")
TEXT = Leaf("_text_problem")
OPERATOR = Leaf("_operator_problem")
VERSION = Leaf("_version_problem")
DEVICE_TYPE = Leaf("_device_type_problem")
SCALAR_TYPE = Leaf("_scalar_type_problem")
LAYOUT = Leaf("_layout_problem")
MEMORY_FORMAT = Leaf("_memory_format_problem")
ARGUMENT_KIND = Leaf("_argument_kind_problem")
ARGUMENT_NAME = Leaf("_argument_name_problem")


def module_path_problem(value: Any) -> str | None:
    """A module's path in the call graph: a state-style path, the root (``""``), or a repeated
    call of one module (``block@1``)."""
    if isinstance(value, str) and _REPEATED_CALL.fullmatch(value):
        value = value.rsplit("@", 1)[0]
    return path_problem(value, root_allowed=True)


def _version_problem(value: Any) -> str | None:
    if isinstance(value, str) and _VERSION.fullmatch(value):
        return None
    return f"expected a version, received {value!r:.60}"


def _device_type_problem(value: Any) -> str | None:
    if isinstance(value, str) and _DEVICE_TYPE.fullmatch(value):
        return None
    return f"expected a device type, received {value!r:.60}"


_scalar_type_problem = _enum_problem(frozenset({0, *range(1, 14), *range(28, 36)}))
_layout_problem = _enum_problem(frozenset(range(8)))
_memory_format_problem = _enum_problem(frozenset(range(5)))
_argument_kind_problem = _enum_problem(frozenset({0, 1, 2}))


def _argument_name_problem(value: Any) -> str | None:
    """Operator argument names: identifiers, or empty for positional builtin arguments."""
    return None if value == "" else name_problem(value)


def _counted(item: Any) -> ListOf:
    return ListOf(item, counted=True)


TENSOR_ARGUMENT = Struct({"name": NAME}, {})
SYM_INT_ARGUMENT = Union({"as_name": NAME, "as_int": INT})
SYM_BOOL_ARGUMENT = Union({"as_name": NAME, "as_bool": BOOL})
SYM_FLOAT_ARGUMENT = Union({"as_name": NAME, "as_float": FLOAT})
OPTIONAL_TENSOR = Union({"as_tensor": TENSOR_ARGUMENT, "as_none": BOOL})
DEVICE = Struct({"type": DEVICE_TYPE}, {"index": Nullable(INT)})
ARGUMENT = Union({
    "as_none": BOOL, "as_tensor": TENSOR_ARGUMENT, "as_tensors": _counted(TENSOR_ARGUMENT),
    "as_int": INT, "as_ints": _counted(INT), "as_float": FLOAT, "as_floats": _counted(FLOAT),
    "as_string": TEXT, "as_strings": _counted(TEXT), "as_bool": BOOL, "as_bools": _counted(BOOL),
    "as_sym_int": SYM_INT_ARGUMENT, "as_sym_ints": _counted(SYM_INT_ARGUMENT),
    "as_sym_bool": SYM_BOOL_ARGUMENT, "as_sym_bools": _counted(SYM_BOOL_ARGUMENT),
    "as_sym_float": SYM_FLOAT_ARGUMENT, "as_sym_floats": _counted(SYM_FLOAT_ARGUMENT),
    "as_optional_tensor": OPTIONAL_TENSOR, "as_optional_tensors": _counted(OPTIONAL_TENSOR),
    "as_scalar_type": SCALAR_TYPE, "as_memory_format": MEMORY_FORMAT, "as_layout": LAYOUT,
    "as_device": DEVICE, "as_complex": Struct({"real": FLOAT, "imag": FLOAT}, {}),
    "as_nested_tensors": _counted(_counted(TENSOR_ARGUMENT)),
    "as_int_lists": _counted(_counted(INT)), "as_float_lists": _counted(_counted(FLOAT)),
})
NAMED_ARGUMENT = Struct({"name": ARGUMENT_NAME, "arg": ARGUMENT}, {"kind": Nullable(ARGUMENT_KIND)})
NODE = Struct({"target": OPERATOR, "inputs": _counted(NAMED_ARGUMENT), "outputs": _counted(ARGUMENT)},
              {"metadata": MapOf(TEXT, TEXT, _MAX_SMALL_MAP), "name": Nullable(NAME),
               "is_hop_single_tensor_return": Nullable(BOOL)})
SYM_EXPR = Struct({"expr_str": EXPRESSION},
                  {"hint": Nullable(Union({"as_int": INT, "as_bool": BOOL, "as_float": FLOAT}))})
SYM_INT = Union({"as_expr": SYM_EXPR, "as_int": INT})
SYM_BOOL = Union({"as_expr": SYM_EXPR, "as_bool": BOOL})
SYM_FLOAT = Union({"as_expr": SYM_EXPR, "as_float": FLOAT})
TENSOR_META = Struct({"dtype": SCALAR_TYPE, "sizes": ListOf(SYM_INT, MAX_TENSOR_RANK),
                      "strides": ListOf(SYM_INT, MAX_TENSOR_RANK), "storage_offset": SYM_INT,
                      "requires_grad": BOOL, "device": DEVICE, "layout": LAYOUT}, {})
GRAPH = Struct({"inputs": ListOf(ARGUMENT), "outputs": ListOf(ARGUMENT),
                "nodes": ListOf(NODE, MAX_PROGRAM_NODES), "tensor_values": MapOf(NAME, TENSOR_META),
                "sym_int_values": MapOf(NAME, SYM_INT), "sym_bool_values": MapOf(NAME, SYM_BOOL)},
               {"is_single_tensor_return": BOOL,
                "custom_obj_values": Empty("it holds custom (script) objects"),
                "sym_float_values": MapOf(NAME, SYM_FLOAT)})
INPUT_SPEC = Union({
    "user_input": Struct({"arg": ARGUMENT}, {}),
    "parameter": Struct({"arg": TENSOR_ARGUMENT, "parameter_name": PATH}, {}),
    "buffer": Struct({"arg": TENSOR_ARGUMENT, "buffer_name": PATH, "persistent": BOOL}, {}),
    "tensor_constant": Struct({"arg": TENSOR_ARGUMENT, "tensor_constant_name": PATH}, {}),
})
OUTPUT_SPEC = Union({
    "user_output": Struct({"arg": ARGUMENT}, {}),
    "buffer_mutation": Struct({"arg": TENSOR_ARGUMENT, "buffer_name": PATH}, {}),
})
MODULE_CALL_SIGNATURE = Struct({"inputs": ListOf(ARGUMENT), "outputs": ListOf(ARGUMENT),
                                "in_spec": TEXT, "out_spec": TEXT},
                               {"forward_arg_names": Nullable(ListOf(NAME))})
GRAPH_MODULE = Struct({
    "graph": GRAPH,
    "signature": Struct({"input_specs": ListOf(INPUT_SPEC), "output_specs": ListOf(OUTPUT_SPEC)}, {}),
    "module_call_graph": ListOf(Struct({"fqn": MODULE_PATH},
                                       {"signature": Nullable(MODULE_CALL_SIGNATURE)})),
}, {"metadata": MapOf(TEXT, TEXT, _MAX_SMALL_MAP),
    "treespec_namedtuple_fields": Empty("it defines named-tuple types")})
PROGRAM = Struct({
    "graph_module": GRAPH_MODULE,
    "opset_version": MapOf(NAME, INT, _MAX_SMALL_MAP),
    "range_constraints": MapOf(EXPRESSION,
                               Struct({"min_val": Nullable(INT), "max_val": Nullable(INT)}, {})),
    "schema_version": Struct({"major": INT, "minor": INT}, {}),
}, {"verifiers": ListOf(NAME, _MAX_SMALL_MAP), "torch_version": VERSION,
    "guards_code": Empty("it carries guard code, which torch would compile and run")})


def render_path(path: tuple | None) -> str:
    """``graph_module.graph.nodes[3].name`` from the linked (parent, key) path of the walk."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    text = "".join(reversed(parts)).lstrip(".")
    return text or "(the program)"


def _key_text(key: str) -> str:
    return key if _IDENTIFIER.fullmatch(key) and len(key) <= MAX_NAME_LENGTH else repr(key[:80])


class _Enough(Exception):
    """Raised once ``_MAX_PROBLEMS`` are found: the rest of the walk is skipped."""


class _Problems(list):
    items = 0  # entries of counted lists seen so far

    def add(self, path: tuple | None, problem: str) -> None:
        self.append(f"{render_path(path)}: {problem}")
        if len(self) >= _MAX_PROBLEMS:
            raise _Enough


def _all_ints(values: list) -> bool:
    return all(type(v) is int and _INT64[0] <= v < _INT64[1] for v in values)


def _all_bools(values: list) -> bool:
    return all(type(v) is bool for v in values)


# Long lists of plain scalars are checked in one pass (their items are then checked one by one
# only to report which is wrong).
_FAST_LIST_CHECKS = {INT: _all_ints, BOOL: _all_bools}


def _compile(kind: Any):
    """A checker ``(value, path, problems)`` for a schema type. The schema is not recursive
    (subgraphs are refused), so checkers nest only as deep as the schema, whatever the input."""
    if isinstance(kind, Leaf):
        name, checks = kind.check, globals()

        def leaf(value, path, problems):
            problem = checks[name](value)  # looked up per call: tests may switch a check off
            if problem:
                problems.add(path, problem)
        return leaf
    if isinstance(kind, Nullable):
        inner = _compile(kind.inner)

        def nullable(value, path, problems):
            if value is not None:
                inner(value, path, problems)
        return nullable
    if isinstance(kind, Empty):
        def empty(value, path, problems):
            if value not in ({}, [], None):
                problems.add(path, f"{kind.reason}; refused")
        return empty
    if isinstance(kind, ListOf):
        item, limit, counted = _compile(kind.item), kind.max_items, kind.counted
        all_fine = _FAST_LIST_CHECKS.get(kind.item) if isinstance(kind.item, Leaf) else None

        def list_of(value, path, problems):
            if type(value) is not list:
                problems.add(path, f"expected a list, received {type(value).__name__}")
            elif len(value) > limit:
                problems.add(path, f"{len(value)} entries, more than the limit of {limit}; refused")
            else:
                if counted:
                    problems.items += len(value)
                    if problems.items > MAX_ARGUMENT_ITEMS:
                        problems.add(path, f"the program's calls have more than {MAX_ARGUMENT_ITEMS} "
                                           "arguments and outputs in all; refused")
                        raise _Enough
                if all_fine is not None and all_fine(value):
                    return
                for i, element in enumerate(value):
                    item(element, (path, i), problems)
        return list_of
    if isinstance(kind, MapOf):
        key_check, value_check, limit = _compile(kind.key), _compile(kind.value), kind.max_items

        def map_of(value, path, problems):
            if type(value) is not dict:
                problems.add(path, f"expected an object, received {type(value).__name__}")
                return
            if len(value) > limit:
                problems.add(path, f"{len(value)} entries, more than the limit of {limit}; refused")
                return
            for key, element in value.items():
                child = (path, _key_text(key))
                key_check(key, child, problems)
                value_check(element, child, problems)
        return map_of
    if isinstance(kind, Union):
        options = {key: _compile(option) for key, option in kind.options.items()}
        expected = ", ".join(sorted(options))

        def union(value, path, problems):
            if type(value) is not dict or len(value) != 1:
                received = sorted(map(_key_text, value))[:8] if type(value) is dict else type(value).__name__
                problems.add(path, f"expected an object with exactly one of {expected}; received {received}")
                return
            (key, element), = value.items()
            option = options.get(key)
            if option is None:
                problems.add(path, f"unsupported entry {_key_text(key)} (expected one of {expected})")
            else:
                option(element, (path, key), problems)
        return union
    fields = {key: _compile(field) for key, field in {**kind.required, **kind.optional}.items()}
    required = frozenset(kind.required)

    def struct(value, path, problems):
        if type(value) is not dict:
            problems.add(path, f"expected an object, received {type(value).__name__}")
            return
        if not required <= value.keys() or not value.keys() <= fields.keys():
            missing = sorted(required - value.keys())
            unknown = [_key_text(k) for k in value if k not in fields]
            problems.add(path, "; ".join(([f"missing {missing}"] if missing else [])
                                         + ([f"unknown keys {unknown[:8]}"] if unknown else [])))
        for key, element in value.items():
            field = fields.get(key)
            if field is not None:
                field(element, (path, key), problems)
    return struct


_CHECK_PROGRAM = _compile(PROGRAM)


def check_schema(program: Any) -> list[str]:
    """Every way ``program`` departs from the schema, as ``field path: problem`` (at most 20)."""
    problems = _Problems()
    try:
        _CHECK_PROGRAM(program, None, problems)
    except _Enough:
        pass
    return list(problems)
