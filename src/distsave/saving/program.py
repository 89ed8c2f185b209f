"""Code-free programs: a ``torch.export`` graph as JSON, weights kept apart in safetensors.

Writing exports on the CPU, decomposes to core ATen and strips source metadata. Reading
never hands the JSON to torch: the program is checked against a strict schema first
(`program_schema`: every name an identifier, every state path a dotted name, every operator on
the allowlist, every symbolic expression plain shape arithmetic, sizes capped, unknown keys
refused), then built into a ``torch.fx.GraphModule`` by our own builder (`program_graph`), where
names from the file link values and never become code. ``torch.export.load``, torch's
deserializer and pickle are never used on artifact contents.
"""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError, SaveError
from .format import MAX_NAME_LENGTH, MAX_PROGRAM_BYTES
from .program_graph import build_graph_module
from .program_schema import (MAX_ARGUMENT_ITEMS, MAX_PROGRAM_NODES, check_schema,
                             operator_allowed)

__all__ = ["MAX_ARGUMENT_ITEMS", "MAX_NAME_LENGTH", "MAX_PROGRAM_BYTES", "MAX_PROGRAM_NODES", "build_program",
           "check_program", "export_program", "operator_allowed", "validate_program"]

def _serialize(exported: Any) -> Any:
    """torch's serializer, imported here: it loads torch._dynamo, which only saving needs.

    Where it can skip pickling the tensors we store apart (torch >= 2.12), it does; older
    versions pickle them into bytes that are dropped unread."""
    from torch._export.serde import serialize as serde

    skip = {name: False for name in ("serialize_state_dict", "serialize_constants", "serialize_example_inputs")
            if name in inspect.signature(serde.serialize).parameters}
    return serde.serialize(exported, **skip)


def _dicts(value: Any):
    """Every JSON object inside ``value`` (iterative: nesting depth costs no stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_program(program: dict[str, Any], where: str) -> list[str]:
    """Every reason the JSON program must not be built (at most 20), each naming its field;
    empty when it is safe to build."""
    if not isinstance(program, dict):
        return [f"{where}: expected a JSON object, received {type(program).__name__}"]
    return [f"{where}: {problem}" for problem in check_schema(program)]


def validate_program(program: dict[str, Any], where: str) -> None:
    """Raise `ArtifactError` listing every problem `check_program` finds."""
    problems = check_program(program, where)
    if problems:
        raise ArtifactError("Refusing to load a program: " + "; ".join(problems) + ". The file was "
                            "not written by distsave or was altered; re-export the signature.")


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


# nn.RNN/LSTM/GRU re-list their own parameters in ``_flat_weights`` when export swaps them for
# traced ones; the program still takes them as parameters. Other attributes still warn.
_RNN_WEIGHTS_REASSIGNED = (r"The tensor attributes [\w.]+\._flat_weights\[\d+\](, [\w.]+\._flat_weights\[\d+\])* "
                           r"were assigned during export")


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
            warnings.filterwarnings("ignore", _RNN_WEIGHTS_REASSIGNED, UserWarning)
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
    artifact = _serialize(exported)
    program = _strip(json.loads(artifact.exported_program))
    problems = check_program(program, where)
    if problems:
        raise SaveError("The exported program could not be loaded safely again: " + "; ".join(problems))
    return program, list(exported.state_dict), constants


def build_program(program: dict[str, Any], state: dict[str, torch.Tensor],
                  constants: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Turn a JSON program and its tensors into a callable module (outputs as a tuple).

    Works under ``torch.device("meta")`` (state as meta tensors): the module then survives
    ``to_empty`` and having its parameters and buffers filled in place.

    Raises:
        ArtifactError: the program fails `check_program`, or does not describe a working graph.
    """
    validate_program(program, where)
    # Fresh (aligned) copies: BLAS may sum in another order on unaligned memory at batch 1.
    # Parameters start frozen (serving needs no gradients); SavedModelLayer may unfreeze them.
    state = {k: v.clone() for k, v in state.items()}
    try:
        return build_graph_module(program, state, dict(constants), where)
    except ArtifactError:
        raise
    except Exception as error:  # any other failure to rebuild is a broken artifact
        raise ArtifactError(f"Could not rebuild the program {where}: {type(error).__name__}: "
                            f"{error}") from None
