"""TF Serving's REST JSON for predict: requests to tensors, tensors to responses.

Follows https://www.tensorflow.org/tfx/serving/api_rest: the row format (``instances``: one
entry per example, answered with ``predictions``) and the columnar format (``inputs``: one
value per input, answered with ``outputs``); a signature with one output is unwrapped, one
with several answers with a dict per row (row format) or a dict of values (columnar).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..training.specs import TensorSpec

__all__ = ["PredictRequest", "ServingError", "decode_predict", "encode_predict"]

# JSON values each kind of dtype accepts, as numpy kinds: a float is never truncated to an int.
_ACCEPTED_KINDS = {"bool": "b", "int": "iu", "float": "iuf"}


class ServingError(Exception):
    """A request the server answers with ``{"error": message}`` and an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ServingError:
    return ServingError(400, message)


@dataclass(frozen=True)
class PredictRequest:
    """A decoded predict request: the signature, its input tensors, and the answer format."""

    signature_name: str
    tensors: dict[str, torch.Tensor]
    row_format: bool


def _to_tensor(value: Any, spec: TensorSpec) -> torch.Tensor:
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise bad_request(f"Input '{spec.name}': not a rectangular array of numbers ({error}).") from None
    target = spec.torch_dtype
    kind = "bool" if target == torch.bool else "float" if target.is_floating_point else "int"
    if array.dtype.kind not in _ACCEPTED_KINDS[kind]:
        received = "strings or objects" if array.dtype.kind in "OUS" else f"{array.dtype.name} values"
        raise bad_request(f"Input '{spec.name}' expects {spec.dtype} values; received JSON {received}. "
                          "Send numbers of that type.")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(target)
    if not spec.matches(tensor):
        received = f"{spec.dtype}[{', '.join(str(d) for d in tensor.shape)}]"
        raise bad_request(f"Input '{spec.name}' expects {spec.describe().split(': ', 1)[1]}; received "
                          f"{received}. Reshape the input to match the signature (see /metadata).")
    return tensor


def _named(value: Any, inputs: Sequence[TensorSpec], where: str) -> dict[str, Any]:
    """``value`` as ``{input name: value}``; a bare value is allowed for one input."""
    names = [s.name for s in inputs]
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise bad_request(f"{where} must name the signature's inputs {names}; "
                              + (f"unknown: {unknown}" if unknown else "") + ("; " if unknown and missing else "")
                              + (f"missing: {missing}" if missing else "") + ".")
        return dict(value)
    if len(names) != 1:
        raise bad_request(f"{where} must be an object with the inputs {names}: the signature has "
                          f"{len(names)} inputs.")
    return {names[0]: value}


def decode_predict(body: Any, inputs_of: Any) -> PredictRequest:
    """Turn a parsed JSON body into tensors for the signature it names.

    Args:
        body: The parsed JSON request.
        inputs_of: ``signature_name -> list[TensorSpec]``; raises `ServingError` if unknown.
    """
    if not isinstance(body, Mapping):
        raise bad_request("JSON Value: request body is not an object. Send "
                          '{"instances": [...]} or {"inputs": ...}.')
    name = body.get("signature_name", "serving_default") or "serving_default"
    if not isinstance(name, str):
        raise bad_request("'signature_name' must be a string.")
    inputs = inputs_of(name)
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise bad_request("Not both 'inputs' and 'instances' can be specified." if has_rows
                          else "Missing 'inputs' or 'instances' key.")
    if has_columns:
        named = _named(body["inputs"], inputs, "'inputs'")
        return PredictRequest(name, {s.name: _to_tensor(named[s.name], s) for s in inputs}, False)
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise bad_request("'instances' must be a non-empty list, one entry per example.")
    if any(s.shape[:1] != (None,) for s in inputs):
        raise bad_request(f"Signature '{name}' has an input without a batch dimension; use the "
                          "columnar format ({\"inputs\": ...}).")
    rows = [_named(row, inputs, f"instances[{i}]") for i, row in enumerate(instances)]
    return PredictRequest(name, {s.name: _to_tensor([row[s.name] for row in rows], s) for s in inputs}, True)


def encode_predict(outputs: Mapping[str, torch.Tensor], row_format: bool) -> dict[str, Any]:
    """The response body for a signature's outputs, in the request's format."""
    values = {name: tensor.detach().cpu() for name, tensor in outputs.items()}
    if not row_format:
        if len(values) == 1:
            return {"outputs": next(iter(values.values())).tolist()}
        return {"outputs": {name: t.tolist() for name, t in values.items()}}
    if len(values) == 1:
        return {"predictions": next(iter(values.values())).tolist()}
    sizes = {t.shape[0] if t.ndim else None for t in values.values()}
    if len(sizes) != 1 or None in sizes:
        raise bad_request("The outputs do not share a batch dimension, so they cannot be returned as "
                          "rows; use the columnar format ({\"inputs\": ...}).")
    columns = {name: t.tolist() for name, t in values.items()}
    return {"predictions": [{name: column[i] for name, column in columns.items()}
                            for i in range(sizes.pop())]}
