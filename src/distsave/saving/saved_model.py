"""The low-level API, as ``tf.saved_model``: `save` with named signatures, and `load`.

``save`` writes the weights once (``model.safetensors``), one JSON program per signature
(``signatures/<name>.json``) and any program constants (``constants.safetensors``). ``load``
(see `loaded`) needs none of the user's code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..strategies import get_strategy
from ..training.model import Model
from ..training.specs import TensorSpec
from .architecture import module_spec
from .commit import write_artifact
from .errors import SaveError
from .format import KIND_SAVED_MODEL, WEIGHTS
from .loaded import ConcreteSignature, LoadedModel, load
from .manifest import ArtifactWriter
from .signatures import DEFAULT_SIGNATURE, Signature, unwrap, write_signatures

__all__ = ["DEFAULT_SIGNATURE", "ConcreteSignature", "LoadedModel", "Signature", "load", "save"]


def _uninitialized(obj: nn.Module) -> list[str]:
    """Names of lazy parameters and buffers whose shapes are not known yet."""
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    return [name for name, t in [*obj.named_parameters(), *obj.named_buffers()] if isinstance(t, lazy)]


def save(obj: nn.Module, path: str | os.PathLike, signatures: Any = None, *,
         input_spec: TensorSpec | Sequence[TensorSpec] | None = None,
         example_inputs: Sequence[torch.Tensor] | None = None,
         output_names: Sequence[str] | None = None) -> None:
    """Save weights and code-free signature programs, loadable without the model's code.

    A model whose inputs are unknown, or whose lazy layers are not built yet, is saved as
    TensorFlow saves an unbuilt model: its (built) weights and structure, no signatures, and a
    warning; ``distsave inspect`` says so.

    Args:
        obj: A distsave `Model` or any ``nn.Module``.
        path: The directory to write (replaced atomically if it is a distsave artifact).
        signatures: None for ``serving_default`` from the input spec; a callable; or
            ``{name: callable or Signature}``. Names are file names: letters, digits, ``_.-``.
        input_spec: The inputs, when ``obj`` cannot tell them; the batch dimension is dynamic.
        example_inputs: Example tensors to take the input spec from instead.
        output_names: Names for ``serving_default``'s outputs.

    Raises:
        SaveError: a signature cannot be exported, has a name that is not a plain file name,
            or uses an operator outside the allowlist; or the write failed (nothing replaced).

    Example:
        >>> distsave.saved_model.save(model, "exported", signatures={
        ...     "serving_default": model, "embed": Signature(model.embed)})
    """
    obj = unwrap(obj)
    spec = [input_spec] if isinstance(input_spec, TensorSpec) else (list(input_spec) if input_spec else None)
    if spec is None and example_inputs is not None:
        spec = [TensorSpec.from_tensor(t, f"input_{i}" if len(example_inputs) > 1 else "x")
                for i, t in enumerate(example_inputs)]
    spec = spec or getattr(obj, "input_spec", None)
    uninitialized = _uninitialized(obj)
    if uninitialized and signatures is not None:
        raise SaveError(f"{type(obj).__name__} has lazy layers whose weights do not exist yet "
                        f"({uninitialized[:3]}), so no signature can be exported. Call the model once "
                        "on a batch first, or save without signatures.")
    if uninitialized or (spec is None and signatures is None):
        warnings.warn(f"Saving {type(obj).__name__} without signatures: its inputs are not known yet"
                      + (" (lazy layers are not built)" if uninitialized else "")
                      + ". Call the model once on a batch, or pass input_spec=, to export a "
                      "serving_default signature.", stacklevel=2)
        spec = None if uninitialized else spec
    try:
        architecture = module_spec(obj)
    except SaveError:
        architecture = None  # structure recorded as tensor names only; signatures still work
    strategy = obj.distribute_strategy if isinstance(obj, Model) else get_strategy()
    state = {k: v for k, v in obj.state_dict().items() if k not in uninitialized}

    def write(writer: ArtifactWriter) -> dict[str, Any]:
        entries = write_signatures(writer, obj, None if uninitialized else signatures,
                                   input_spec=spec, output_names=output_names)
        return {"kind": KIND_SAVED_MODEL, "architecture": architecture,
                "input_spec": None if spec is None else [s.to_json() for s in spec],
                "parameter_count": sum(v.numel() for k, v in obj.named_parameters() if k not in uninitialized),
                "uninitialized": uninitialized,
                "variables": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                              for k, v in state.items()},
                "signatures": entries}

    write_artifact(strategy, path, write, {WEIGHTS: state})
