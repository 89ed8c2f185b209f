"""A signature described as TF Serving's ``signature_def`` (GET ``/metadata``).

The artifact records input specs and output names; output dtypes and shapes are found by
calling the signature on zeros at batch sizes 1 and 2 (a dimension that follows the batch is
reported as -1, as TF Serving does). The same calls warm the program up before it serves.
"""

from __future__ import annotations

from typing import Any

import torch

from ..saved_model import ConcreteSignature
from ..training.specs import TensorSpec

__all__ = ["SignatureInfo", "describe_signature"]

_TF_DTYPES = {
    torch.float32: "DT_FLOAT", torch.float64: "DT_DOUBLE", torch.float16: "DT_HALF",
    torch.bfloat16: "DT_BFLOAT16", torch.int64: "DT_INT64", torch.int32: "DT_INT32",
    torch.int16: "DT_INT16", torch.int8: "DT_INT8", torch.uint8: "DT_UINT8", torch.bool: "DT_BOOL",
}
PREDICT_METHOD = "tensorflow/serving/predict"


def _tensor_info(name: str, dtype: torch.dtype, dims: list[int | None]) -> dict[str, Any]:
    return {"dtype": _TF_DTYPES.get(dtype, "DT_INVALID"),
            "tensor_shape": {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in dims],
                             "unknown_rank": False},
            "name": name}


class SignatureInfo:
    """A signature's ``signature_def`` JSON, and whether requests to it can be batched."""

    def __init__(self, signature_def: dict[str, Any], batchable: bool):
        self.signature_def = signature_def
        self.batchable = batchable


def _example(spec: TensorSpec, batch: int) -> torch.Tensor:
    return spec.example(batch) if spec.shape[:1] == (None,) else spec.example(1)


def describe_signature(signature: ConcreteSignature) -> SignatureInfo:
    """Describe ``signature`` (runs it twice on zeros; raises what the signature raises)."""
    with torch.no_grad():
        one, two = (signature(**{s.name: _example(s, b) for s in signature.inputs}) for b in (1, 2))
    outputs, batchable = {}, all(s.shape[:1] == (None,) for s in signature.inputs)
    for name in signature.output_names:
        a, b = one[name], two[name]
        dims = [None if da != db else da for da, db in zip(a.shape, b.shape)]
        batchable = batchable and a.ndim > 0 and a.shape[0] == 1 and b.shape[0] == 2
        outputs[name] = _tensor_info(name, a.dtype, dims)
    inputs = {s.name: _tensor_info(s.name, s.torch_dtype, list(s.shape)) for s in signature.inputs}
    return SignatureInfo({"inputs": inputs, "outputs": outputs, "method_name": PREDICT_METHOD}, batchable)
