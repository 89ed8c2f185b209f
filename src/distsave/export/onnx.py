"""ONNX export of a saved signature, for onnxruntime and other ONNX runtimes.

The artifact's program is already a code-free ``torch.export`` graph of core ATen operators;
`saved_model.load` rebuilds it (with every check) as a module, which
``torch.onnx.export(dynamo=True)`` exports again and translates. Open dimensions of the
signature (the batch, usually) stay dynamic in the ONNX graph. Needs ``onnx`` and
``onnxscript`` (``pip install 'distsave[onnx]'``); ``onnxruntime`` only to compare outputs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import saved_model
from ..saving.storage import download_artifact, is_remote
from ..training.specs import TensorSpec

__all__ = ["compare_with_onnxruntime", "export_onnx"]

logger = logging.getLogger(__name__)


def _load(path: str | os.PathLike) -> saved_model.LoadedModel:
    if is_remote(path):
        with download_artifact(os.fspath(path)) as local:
            return saved_model.load(local)
    return saved_model.load(path)


def _signature(loaded: saved_model.LoadedModel, name: str) -> saved_model.ConcreteSignature:
    if name not in loaded.signatures:
        raise ValueError(f"The artifact has no signature {name!r}; it has {sorted(loaded.signatures)}. "
                         "Pass one of them with --signature.")
    return loaded.signatures[name]


def _dynamic_shapes(signature: saved_model.ConcreteSignature) -> tuple[dict[int, torch.export.Dim], ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({i: batch if i == 0 else torch.export.Dim(f"{spec.name}_dim{i}", min=1)
                  for i, d in enumerate(spec.shape) if d is None} for spec in signature.inputs)


def export_onnx(path: str | os.PathLike, out: str | os.PathLike, *,
                signature: str = saved_model.DEFAULT_SIGNATURE, opset_version: int | None = None) -> Path:
    """Write one signature of a saved artifact as an ONNX model.

    Args:
        path: The artifact (a directory or an fsspec URL); loaded with all of `saved_model.load`'s checks.
        out: The ``.onnx`` file to write.
        signature: Which signature; its input and output names become the ONNX graph's.
        opset_version: The ONNX opset; default: the exporter's.

    Returns:
        The path written.

    Raises:
        ArtifactError: the artifact fails a check. ValueError: no such signature.
        ImportError: ``onnx`` / ``onnxscript`` are not installed.

    Example:
        >>> export_onnx("mnist_model", "mnist.onnx")
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency, checked for a clear message)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'distsave[onnx]'.") from None
    chosen = _signature(_load(path), signature)
    examples = tuple(spec.example(2) for spec in chosen.inputs)
    with warnings.catch_warnings():
        # The rebuilt program has no training mode: it was exported in eval mode.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(chosen.module, examples, dynamo=True, verbose=False,
                                    input_names=[s.name for s in chosen.inputs],
                                    output_names=list(chosen.output_names),
                                    dynamic_shapes=_dynamic_shapes(chosen), opset_version=opset_version)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    logger.info("wrote signature %s of %s to %s", signature, path, out)
    return out


def _example_input(spec: TensorSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = [batch if d is None else d for d in spec.shape]
    if spec.torch_dtype.is_floating_point:
        return torch.rand(shape, generator=generator).to(spec.torch_dtype)
    return torch.zeros(shape, dtype=spec.torch_dtype)


def compare_with_onnxruntime(onnx_path: str | os.PathLike, path: str | os.PathLike, *,
                             signature: str = saved_model.DEFAULT_SIGNATURE,
                             batch_sizes: Sequence[int] = (1, 64), seed: int = 0) -> dict[int, float]:
    """Largest absolute difference between onnxruntime and the signature, per batch size.

    Inputs are uniform random floats in [0, 1) (zeros for integer inputs).

    Raises:
        ImportError: onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("Comparing with onnxruntime needs it installed: pip install onnxruntime.") from None
    chosen = _signature(_load(path), signature)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for batch in batch_sizes:
        inputs = {s.name: _example_input(s, batch, generator) for s in chosen.inputs}
        with torch.no_grad():
            expected = chosen(**inputs)
        got = session.run(list(chosen.output_names), {k: v.numpy() for k, v in inputs.items()})
        differences[batch] = max(float((torch.from_numpy(g) - expected[n].cpu()).abs().max())
                                 for n, g in zip(chosen.output_names, got))
    return differences
