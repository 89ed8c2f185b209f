"""Build a runnable ``torch.fx.GraphModule`` from a schema-checked JSON program.

Why not torch's deserializer: it rebuilds fake tensors and a shape environment for every value
(most of its ~2.5 ms a node), and it pastes names read from the file into the Python source
that torch.fx generates and executes. Here a program only needs to run: names from the file
are dictionary keys that link values, never code. Inputs are named ``input_<i>``, nodes take
names torch.fx derives from their operator, and the only text from the file in the generated
source is state paths (checked dotted names, ``0.weight``), which torch.fx needs to fetch
parameters. Operators come from the allowlist; argument values become Python objects (ints,
dtypes) that torch.fx writes with ``repr``, and devices the device of the program's first input.
"""

from __future__ import annotations

import keyword
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from ..training.fast_pool import max_pool2d_with_indices
from .errors import ArtifactError
from .program_rewrites import fuse_conv_blocks
from .program_schema import MAX_PROGRAM_NODES, resolve_operator

__all__ = ["build_graph_module"]

_DEVICE_ASSERT = "torch.ops.aten._assert_tensor_metadata.default"
_FLOAT_WORDS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# Allowlisted operators that run through an equivalent, faster function (same values, indices
# and gradients): PyTorch's CPU kernel for NCHW max pooling is a scalar loop.
_FASTER = {torch.ops.aten.max_pool2d_with_indices.default: max_pool2d_with_indices}
_STATE_KEYS = {"parameter": "parameter_name", "buffer": "buffer_name",
               "tensor_constant": "tensor_constant_name"}


# The program format's enum numbers (torch._export.serde.schema, schema version 8) and the torch
# types they name: torch's own tables live in its serializer, whose import loads torch._dynamo
# (over a second), so a load keeps these; tests/saving/test_program_enums.py checks they agree.
SCALAR_TYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
                6: torch.float16, 7: torch.float32, 8: torch.float64, 9: torch.complex32,
                10: torch.complex64, 11: torch.complex128, 12: torch.bool, 13: torch.bfloat16,
                28: torch.uint16, 29: torch.float8_e4m3fn, 30: torch.float8_e5m2,
                31: torch.float8_e4m3fnuz, 32: torch.float8_e5m2fnuz, 33: torch.float8_e8m0fnu,
                34: torch.uint32, 35: torch.uint64}
LAYOUTS = {1: torch.sparse_coo, 2: torch.sparse_csr, 3: torch.sparse_csc, 4: torch.sparse_bsr,
           5: torch.sparse_bsc, 6: torch._mkldnn, 7: torch.strided}
MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
                  4: torch.preserve_format}


class _Broken(Exception):
    """A program that passed the schema but does not describe a working graph."""


def _only(union: dict[str, Any]) -> tuple[str, Any]:
    (kind, body), = union.items()
    return kind, body


def _float(value: Any) -> float:
    return _FLOAT_WORDS[value] if isinstance(value, str) else float(value)


class _GraphBuilder:
    """One pass over a program: state attached to the module, values linked by name."""

    def __init__(self):
        self.module = fx.GraphModule(nn.Module(), fx.Graph(), class_name="Program")
        self.graph = fx.Graph()
        self.values: dict[str, Any] = {}
        self.state_nodes: dict[str, fx.Node] = {}
        self.first_input: fx.Node | None = None
        self.input_device: fx.Node | None = None

    def define(self, name: str, value: Any, field: str) -> None:
        if name in self.values:
            raise _Broken(f"{field}: value {name!r} is defined twice")
        self.values[name] = value

    def value(self, name: str, field: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise _Broken(f"{field}: refers to value {name!r} before it is defined") from None

    def argument(self, argument: dict[str, Any], field: str) -> Any:
        """The Python value (or graph node) an ``Argument`` union stands for."""
        kind, body = _only(argument)
        field = f"{field}.{kind}"
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self.value(body["name"], field)
        if kind == "as_tensors":
            return [self.value(t["name"], field) for t in body]
        if kind == "as_nested_tensors":
            return [[self.value(t["name"], field) for t in inner] for inner in body]
        if kind in ("as_optional_tensor", "as_sym_int", "as_sym_bool", "as_sym_float"):
            return self.scalar_or_name(body, field)
        if kind in ("as_optional_tensors", "as_sym_ints", "as_sym_bools", "as_sym_floats"):
            return [self.scalar_or_name(item, field) for item in body]
        if kind in ("as_int", "as_bool", "as_string"):
            return body
        if kind in ("as_ints", "as_bools", "as_strings"):
            return list(body)
        if kind == "as_float":
            return _float(body)
        if kind == "as_floats":
            return [_float(x) for x in body]
        if kind == "as_int_lists":
            return [list(x) for x in body]
        if kind == "as_float_lists":
            return [[_float(x) for x in inner] for inner in body]
        if kind == "as_complex":
            return complex(_float(body["real"]), _float(body["imag"]))
        if kind == "as_scalar_type":
            return self.enum(SCALAR_TYPES, body, field)
        if kind == "as_memory_format":
            return self.enum(MEMORY_FORMATS, body, field)
        if kind == "as_layout":
            return self.enum(LAYOUTS, body, field)
        if kind == "as_device":
            return self.device(body, field)
        raise _Broken(f"{field}: unsupported argument")

    def device(self, body: dict[str, Any], field: str) -> torch.device | fx.Node:
        """The device of the program's first input, where the file names a device. The file
        records the device the program was exported on (the CPU, or ``meta`` for the rebuild
        that ``model.save`` exports) for each tensor the graph creates (``torch.arange(n,
        device=x.device)``, an RNN's first state); read from the input instead, the program runs
        wherever it is moved, as its source does. A malformed device is still refused."""
        try:
            recorded = torch.device(body["type"], body.get("index"))
        except RuntimeError as error:
            raise _Broken(f"{field}: {error}") from None
        if self.first_input is None:
            return recorded
        if self.input_device is None:
            self.input_device = self.graph.call_function(getattr, (self.first_input, "device"))
        return self.input_device

    def scalar_or_name(self, union: dict[str, Any], field: str) -> Any:
        kind, body = _only(union)
        if kind == "as_name":
            return self.value(body, field)
        if kind == "as_tensor":
            return self.value(body["name"], field)
        if kind == "as_none":
            return None
        return _float(body) if kind == "as_float" else body

    @staticmethod
    def enum(table: dict, value: int, field: str) -> Any:
        if value not in table:
            raise _Broken(f"{field}: {value} names no torch type")
        return table[value]

    def attach(self, path: str, tensor: torch.Tensor, kind: str, persistent: bool, field: str) -> None:
        """Register ``tensor`` at ``path`` (``0.weight``) on the module, making submodules."""
        *owners, leaf = path.split(".")
        owner: nn.Module = self.module
        for part in owners:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise _Broken(f"{field}: {path!r} clashes with an attribute of the module")
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if hasattr(owner, leaf):
            raise _Broken(f"{field}: {path!r} is defined twice or clashes with an attribute")
        if kind == "parameter":
            owner.register_parameter(leaf, tensor if isinstance(tensor, nn.Parameter)
                                     else nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(leaf, tensor, persistent=persistent)

    def inputs(self, graph: dict[str, Any], specs: list[dict[str, Any]],
               state: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]) -> None:
        """Placeholders for user inputs; parameters, buffers and constants as module state."""
        if len(graph["inputs"]) != len(specs):
            raise _Broken(f"graph_module.graph.inputs: {len(graph['inputs'])} inputs but "
                          f"{len(specs)} input specs")
        metas = graph["tensor_values"]
        user_inputs = 0
        for i, (spec, argument) in enumerate(zip(specs, graph["inputs"])):
            field = f"graph_module.signature.input_specs[{i}]"
            kind, body = _only(spec)
            arg_kind, arg = _only(body["arg"]) if kind == "user_input" else ("as_tensor", body["arg"])
            if arg_kind != "as_tensor" or argument != {"as_tensor": {"name": arg["name"]}}:
                raise _Broken(f"{field}: does not match graph input {i} (signatures take tensors)")
            if kind == "user_input":
                node = self.graph.placeholder(f"input_{user_inputs}")
                if self.first_input is None:
                    self.first_input = node
                user_inputs += 1
            else:
                path = body[_STATE_KEYS[kind]]
                persistent = kind == "parameter" or (kind == "buffer" and body["persistent"])
                source = state if persistent else constants
                if path not in source:
                    raise _Broken(f"{field}: the artifact holds no tensor {path!r} for this program")
                tensor = source[path]
                self.check_meta(metas.get(arg["name"]), tensor, path, field)
                self.attach(path, tensor, kind, persistent, f"{field}.{kind}.{_STATE_KEYS[kind]}")
                node = self.graph.get_attr(path)
                self.state_nodes[path] = node
            self.define(arg["name"], node, field)
        unused = sorted(set(state) - set(self.state_nodes))
        if unused:
            raise _Broken(f"graph_module.signature.input_specs: the program uses no state named "
                          f"{unused[:5]}, but the artifact gives it")

    def check_meta(self, meta: dict[str, Any] | None, tensor: torch.Tensor, path: str, field: str) -> None:
        """The stored tensor has the dtype and (static) shape the graph was traced with."""
        if meta is None:
            return
        dtype = SCALAR_TYPES.get(meta["dtype"])
        sizes = [s.get("as_int") for s in meta["sizes"]]
        if dtype != tensor.dtype or (None not in sizes and list(tensor.shape) != sizes):
            raise _Broken(f"{field}: {path!r} is {tensor.dtype} {list(tensor.shape)} in the artifact, "
                          f"but the program was traced with {dtype} {sizes}")

    def node(self, index: int, node: dict[str, Any]) -> None:
        """One call, and names for each of its outputs."""
        if node["target"] == _DEVICE_ASSERT:
            return  # pins the export's device; signatures check their inputs themselves
        field = f"graph_module.graph.nodes[{index}]"
        target = resolve_operator(node["target"])
        target = _FASTER.get(target, target)
        given = {}
        for j, named in enumerate(node["inputs"]):
            if named["name"] in given:
                raise _Broken(f"{field}.inputs[{j}]: argument {named['name']!r} given twice")
            key = named["name"] if named["name"] else j  # builtins take unnamed positional arguments
            given[key] = self.argument(named["arg"], f"{field}.inputs[{j}].arg")
        if isinstance(target, torch._ops.OpOverload):
            args, kwargs = _place_arguments(target, given, field)
        else:
            args, kwargs = tuple(given.values()), {}
        call = self.graph.call_function(target, args, kwargs)
        self.outputs(call, node["outputs"], field)

    def outputs(self, call: fx.Node, outputs: list[dict[str, Any]], field: str) -> None:
        if len(outputs) == 1:
            kind, body = _only(outputs[0])
            if kind == "as_tensor" or (kind.startswith("as_sym_") and not kind.endswith("s")):
                name = body["name"] if kind == "as_tensor" else body.get("as_name")
                if name is not None:
                    self.define(name, call, f"{field}.outputs[0]")
                return
            if kind == "as_tensors":
                self.items(call, body, f"{field}.outputs[0].as_tensors")
                return
        for j, output in enumerate(outputs):
            kind, body = _only(output)
            if kind == "as_tensor" or (kind.startswith("as_sym_") and not kind.endswith("s")):
                name = body["name"] if kind == "as_tensor" else body.get("as_name")
                if name is not None:
                    self.define(name, self.graph.call_function(operator.getitem, (call, j)),
                                f"{field}.outputs[{j}]")
            elif kind == "as_tensors":
                inner = self.graph.call_function(operator.getitem, (call, j))
                self.items(inner, body, f"{field}.outputs[{j}].as_tensors")

    def items(self, call: fx.Node, tensors: list[dict[str, Any]], field: str) -> None:
        for k, tensor in enumerate(tensors):
            self.define(tensor["name"], self.graph.call_function(operator.getitem, (call, k)), f"{field}[{k}]")

    def results(self, graph: dict[str, Any], specs: list[dict[str, Any]]) -> None:
        """The output node: user outputs as a tuple; buffer updates copied into the buffers."""
        if len(graph["outputs"]) != len(specs):
            raise _Broken(f"graph_module.graph.outputs: {len(graph['outputs'])} outputs but "
                          f"{len(specs)} output specs")
        results = []
        for i, (spec, output) in enumerate(zip(specs, graph["outputs"])):
            field = f"graph_module.signature.output_specs[{i}]"
            kind, body = _only(spec)
            expected = body["arg"] if kind == "user_output" else {"as_tensor": body["arg"]}
            if expected != output:
                raise _Broken(f"{field}: does not match graph output {i}")
            value = self.argument(output, f"graph_module.graph.outputs[{i}]")
            if kind == "user_output":
                results.append(value)
            elif body["buffer_name"] in self.state_nodes:
                self.graph.call_function(torch.ops.aten.copy_.default, (self.state_nodes[body["buffer_name"]], value))
            else:
                raise _Broken(f"{field}: updates {body['buffer_name']!r}, which is not a buffer input")
        self.graph.output(tuple(results))


def _graph_size(graph: dict[str, Any]) -> int:
    """At least the number of nodes the built graph will have: inputs and state, calls, their
    output items, buffer updates, the output node and the input's device."""
    size = len(graph["inputs"]) + len(graph["outputs"]) + 2
    for node in graph["nodes"]:
        outputs = node["outputs"]
        lists = sum(len(o["as_tensors"]) for o in outputs if isinstance(o.get("as_tensors"), list))
        size += 1 + lists + (len(outputs) if len(outputs) > 1 else 0)
    return size


def _place_arguments(op: torch._ops.OpOverload, given: dict[Any, Any],
                     field: str) -> tuple[tuple, dict[str, Any]]:
    """Arguments by the operator's own schema: positional while none is skipped, then keywords
    (their names come from the schema, never from the file)."""
    arguments = op._schema.arguments
    unknown = [name for name in given if name not in {a.name for a in arguments}]
    if unknown:
        raise _Broken(f"{field}: {op} has no argument(s) {unknown[:5]}")
    args, kwargs, positional = [], {}, True
    for schema_argument in arguments:
        name = schema_argument.name
        if name not in given:
            if not schema_argument.has_default_value():
                raise _Broken(f"{field}: {op} needs argument {name!r}")
            positional = False
        elif positional and not schema_argument.kwarg_only:
            args.append(given[name])
        elif keyword.iskeyword(name):
            raise _Broken(f"{field}: argument {name!r} of {op} cannot be passed by keyword")
        else:
            kwargs[name] = given[name]
    return tuple(args), kwargs


def build_graph_module(program: dict[str, Any], state: dict[str, torch.Tensor],
                       constants: dict[str, torch.Tensor], where: str) -> fx.GraphModule:
    """The program as a module: call it with the user inputs, get a tuple of its outputs.

    ``program`` must have passed `program_schema.check_schema`. Parameters and persistent
    buffers come from ``state`` (by path), constants and non-persistent buffers from
    ``constants``; both are registered as given (no copy).

    Raises:
        ArtifactError: the program does not describe a working graph (naming the field).
    """
    module_json = program["graph_module"]
    graph, signature = module_json["graph"], module_json["signature"]
    builder = _GraphBuilder()
    try:
        size = _graph_size(graph)
        if size > MAX_PROGRAM_NODES:
            raise _Broken(f"graph_module.graph: the program would build {size} graph nodes (inputs, "
                          f"state, calls and their output items), more than {MAX_PROGRAM_NODES}; refused")
        builder.inputs(graph, signature["input_specs"], state, constants)
        for index, node in enumerate(graph["nodes"]):
            builder.node(index, node)
        builder.results(graph, signature["output_specs"])
        fuse_conv_blocks(builder.graph)
        builder.module.graph = builder.graph
    except _Broken as error:
        raise ArtifactError(f"Could not rebuild the program {where}: {error}.") from None
    return builder.module
