"""Worst-case program loading: time to check and build programs at the caps.

Each case is a hostile-shaped but valid program near ``MAX_PROGRAM_NODES`` nodes or
``MAX_ARGUMENT_ITEMS`` argument items; the script prints one JSON line per case with its size and the
seconds spent parsing, checking and building it (and calling it once on a small batch).

    python benchmarks/program_load.py                 # every case at the caps
    python benchmarks/program_load.py chain --nodes 10000
    python benchmarks/program_load.py chain --nodes 2000 --against-torch   # vs torch's deserializer
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from distsave.saving.errors import ArtifactError
from distsave.saving.program import MAX_ARGUMENT_ITEMS, MAX_PROGRAM_NODES, build_program

_FEATURES = 8


def _meta(symbolic: bool = True) -> dict[str, Any]:
    batch = {"as_expr": {"expr_str": "s0", "hint": {"as_int": 2}}} if symbolic else {"as_int": 2}
    return {"dtype": 7, "sizes": [batch, {"as_int": _FEATURES}], "requires_grad": False,
            "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": _FEATURES}, {"as_int": 1}], "storage_offset": {"as_int": 0},
            "layout": 7}


def _node(target: str, inputs: list[tuple[str, dict]], outputs: list[dict], name: str) -> dict[str, Any]:
    return {"target": f"torch.ops.aten.{target}", "metadata": {}, "is_hop_single_tensor_return": None,
            "inputs": [{"name": n, "arg": a, "kind": 1} for n, a in inputs], "outputs": outputs,
            "name": name}


def _program(nodes: list[dict], values: list[str], output: str) -> dict[str, Any]:
    return {
        "graph_module": {
            "graph": {"inputs": [{"as_tensor": {"name": "x"}}],
                      "outputs": [{"as_tensor": {"name": output}}], "nodes": nodes,
                      "tensor_values": {v: _meta() for v in values}, "sym_int_values": {},
                      "sym_bool_values": {}, "is_single_tensor_return": False,
                      "custom_obj_values": {}, "sym_float_values": {}},
            "signature": {"input_specs": [{"user_input": {"arg": {"as_tensor": {"name": "x"}}}}],
                          "output_specs": [{"user_output": {"arg": {"as_tensor": {"name": output}}}}]},
            "module_call_graph": [{"fqn": "", "signature": None}],
            "metadata": {}, "treespec_namedtuple_fields": {}},
        "opset_version": {"aten": 10}, "range_constraints": {"s0": {"min_val": 1, "max_val": None}},
        "schema_version": {"major": 8, "minor": 20}, "verifiers": ["ATEN"],
        "torch_version": torch.__version__, "guards_code": []}


def chain(nodes: int) -> dict[str, Any]:
    """``nodes`` element-wise calls in a row, each value with its tensor metadata (export's shape)."""
    values = ["x"] + [f"relu_{i}" for i in range(nodes)]
    calls = [_node("relu.default", [("self", {"as_tensor": {"name": values[i]}})],
                   [{"as_tensor": {"name": values[i + 1]}}], values[i + 1]) for i in range(nodes)]
    return _program(calls, values, values[-1])


def fanout(nodes: int) -> dict[str, Any]:
    """One call split into outputs that each become a graph node, joined again by one call."""
    pieces = nodes - 6
    outputs = [{"as_tensor": {"name": f"part_{i}"}} for i in range(pieces)]
    split = _node("split_with_sizes.default", [("self", {"as_tensor": {"name": "x"}}),
                                                 ("split_sizes", {"as_ints": [1] * pieces}),
                                                 ("dim", {"as_int": 1})],
                  [{"as_tensors": [o["as_tensor"] for o in outputs]}], "split")
    cat = _node("cat.default", [("tensors", {"as_tensors": [o["as_tensor"] for o in outputs]}),
                                ("dim", {"as_int": 1})], [{"as_tensor": {"name": "joined"}}], "joined")
    return _program([split, cat], ["x", "joined"], "joined")


def long_lists(nodes: int) -> dict[str, Any]:
    """``nodes`` calls whose integer lists use up the budget of argument items (source text
    torch.fx must write and compile)."""
    per_node = max(1, (MAX_ARGUMENT_ITEMS - 16) // nodes - 4)
    values = ["x"] + [f"sum_{i}" for i in range(nodes)]
    calls = [_node("sum.dim_IntList", [("self", {"as_tensor": {"name": "x"}}),
                                       ("dim", {"as_ints": [1] * per_node})],
                   [{"as_tensor": {"name": values[i + 1]}}], values[i + 1]) for i in range(nodes)]
    return _program(calls, values, values[-1])


CASES = {"chain": chain, "fanout": fanout, "long_lists": long_lists}


def measure(case: str, nodes: int) -> dict[str, Any]:
    """Seconds to parse, check + build, and call a program of this case (a fresh process each)."""
    text = json.dumps(CASES[case](nodes), separators=(",", ":")).encode()
    start = time.perf_counter()
    program = json.loads(text)
    parsed = time.perf_counter()
    result: dict[str, Any] = {"case": case, "nodes": nodes, "bytes": len(text)}
    try:
        module = build_program(program, {}, {}, f"benchmark {case}")
        built = time.perf_counter()
        result.update(parse_s=round(parsed - start, 2), check_and_build_s=round(built - parsed, 2))
        try:
            module(torch.rand(2, _FEATURES))
            result["call_s"] = round(time.perf_counter() - built, 2)
        except RuntimeError as error:  # shapes chosen for size, not meaning
            result["call"] = f"raised {type(error).__name__}"
    except ArtifactError as error:
        result.update(parse_s=round(parsed - start, 2), refused_s=round(time.perf_counter() - parsed, 2),
                      refused=str(error)[:160])
    return result


def torch_deserializer_seconds(case: str, nodes: int) -> float:
    """Seconds torch's own deserializer takes for the same program (what distsave used before)."""
    from torch._export.serde import serialize as serde

    program = CASES[case](nodes)
    in_spec = json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": [
            {"type": None, "context": None, "children_spec": []}]},
        {"type": "builtins.dict", "context": "[]", "children_spec": []}]}])
    out_spec = json.dumps([1, {"type": None, "context": None, "children_spec": []}])
    program["graph_module"]["module_call_graph"][0]["signature"] = {
        "inputs": [], "outputs": [], "in_spec": in_spec, "out_spec": out_spec, "forward_arg_names": ["x"]}
    start = time.perf_counter()
    serde.deserialize(serde.SerializedArtifact(json.dumps(program).encode(), {}, {}, b"")).module()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="case", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--nodes", type=int, default=MAX_PROGRAM_NODES - 4,
                        help="calls in the program (default: the most that fit under the cap)")
    parser.add_argument("--against-torch", action="store_true",
                        help="also time torch's own deserializer on the same program")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    for case in args.cases or CASES:
        result = measure(case, args.nodes)
        if args.against_torch:
            result["torch_deserializer_s"] = torch_deserializer_seconds(case, args.nodes)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
