"""Signatures, export side: which functions become named programs, and writing them.

A signature is a function of tensors (the model, one of its methods, or a function that closes
over a CPU model) with an input spec. Each is exported with ``torch.export`` into a JSON program
that `loaded.load` can run without the user's code; the weights are stored once and shared.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..training.specs import TensorSpec
from .errors import SaveError
from .format import CONSTANTS, check_signature_name, signature_file
from .manifest import ArtifactWriter
from .program import export_program

__all__ = ["DEFAULT_SIGNATURE", "ExportedSignatures", "Signature", "export_signatures", "unwrap",
           "write_signatures"]

DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Signature:
    """A function to export as a named signature.

    Args:
        fn: The model itself, one of its methods (``model.embed``), or a function of tensors.
        input_spec: Its inputs; default: the model's input spec.
        output_names: Names of its outputs; default: a dict's keys, else ``output_0``, ….
    """

    fn: Callable
    input_spec: Sequence[TensorSpec] | None = None
    output_names: Sequence[str] | None = None


def unwrap(module: Any) -> Any:
    """The user's module under DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _cpu_clone(module: nn.Module) -> nn.Module:
    """A CPU copy in eval mode for export (a `Model`'s runtime — strategy, optimizer, training
    wrapper, device datasets — is shared, not copied)."""
    return copy.deepcopy(module).cpu().eval()


class _Bound(nn.Module):
    """A signature function as the ``forward`` of a module that owns the model as ``root``."""

    def __init__(self, root: nn.Module, fn: Callable):
        super().__init__()
        self.root = root
        self._fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self._fn(*args)


def _output_names(example: Any, given: Sequence[str] | None, where: str) -> list[str]:
    if isinstance(example, Mapping):
        names = [str(k) for k in example]
    elif isinstance(example, torch.Tensor):
        names = ["output_0"]
    elif isinstance(example, (tuple, list)):
        names = [f"output_{i}" for i in range(len(example))]
    else:
        raise SaveError(f"{where} returns {type(example).__name__}; signatures must return a tensor, "
                        "a tuple of tensors or a dict of tensors.")
    if given is not None:
        if len(given) != len(names):
            raise SaveError(f"{where} has {len(names)} outputs but output_names has {len(given)}.")
        names = [str(n) for n in given]
    return names


def _resolve_signatures(obj: nn.Module, signatures: Any, input_spec: list[TensorSpec] | None,
                        output_names: Sequence[str] | None) -> dict[str, Signature]:
    if signatures is None:
        return {} if input_spec is None else {DEFAULT_SIGNATURE: Signature(obj, input_spec, output_names)}
    if callable(signatures) and not isinstance(signatures, Mapping):
        signatures = {DEFAULT_SIGNATURE: signatures}
    if not isinstance(signatures, Mapping):
        raise TypeError(f"Expected signatures as a callable or a {{name: callable}} dict. Received: {signatures!r}.")
    resolved = {}
    for name, fn in signatures.items():
        sig = fn if isinstance(fn, Signature) else Signature(fn)
        spec = sig.input_spec or input_spec
        if spec is None:
            raise SaveError(f"Signature {name!r} needs its inputs: pass input_spec= or example_inputs= "
                            "to saved_model.save, or a distsave.saved_model.Signature(fn, input_spec=...).")
        resolved[check_signature_name(name)] = Signature(sig.fn, list(spec), sig.output_names or (
            output_names if sig.fn is obj else None))
    return resolved


@contextlib.contextmanager
def _exportable(obj: nn.Module, fn: Callable) -> Iterator[nn.Module]:
    """A CPU (or ``meta``) module in eval mode whose forward is ``fn``; ``obj`` itself is left
    as it was.

    A CPU or meta model is exported in place (so functions that close over it see its
    parameters); a GPU model through a CPU copy, where only the model and its methods can be
    exported.
    """
    if all(t.device.type in ("cpu", "meta") for t in obj.state_dict().values()):
        modes = {m: m.training for m in obj.modules()}
        obj.eval()
        try:
            yield obj if fn is obj else _Bound(obj, fn)
        finally:
            for module, training in modes.items():
                module.training = training
        return
    clone = _cpu_clone(obj)
    if fn is obj:
        yield clone
    elif getattr(fn, "__self__", None) is obj:
        yield _Bound(clone, getattr(clone, fn.__name__))
    else:
        raise SaveError("A signature function that is neither the model nor one of its methods can "
                        "only be exported from a model on the CPU. Make it a method of the model, or "
                        "save a CPU copy.")


def _prepare(obj: nn.Module, name: str, sig: Signature) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Export one signature: (program JSON, manifest entry, constants to store)."""
    with _exportable(obj, sig.fn) as root:
        return _export_signature(root, "root." if isinstance(root, _Bound) else "", name, sig)


def _export_signature(root: nn.Module, prefix: str, name: str,
                      sig: Signature) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    device = next(iter(root.state_dict().values()), torch.empty(0)).device
    examples = tuple(s.example(2, device) for s in sig.input_spec)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({i: (batch if i == 0 else torch.export.Dim(f"{s.name}_dim{i}", min=1))
                     for i, d in enumerate(s.shape) if d is None} for s in sig.input_spec)
    parameters = list(inspect.signature(root.forward).parameters.values())
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dynamic = (dynamic,)  # forward(*args): export wants one entry holding all of them
    with torch.no_grad():
        example_out = root(*examples)
    where = f"signature {name!r}"
    outputs = _output_names(example_out, sig.output_names, where)
    program, state_targets, constants = export_program(root, examples, dynamic, where)
    entry = {"program": signature_file(name),
             "inputs": [s.to_json() for s in sig.input_spec],
             "outputs": outputs,
             "state": {t: t.removeprefix(prefix) for t in state_targets},
             "constants": {c: f"{name}/{c}" for c in constants}}
    return program, entry, {f"{name}/{c}": t for c, t in constants.items()}


@dataclass(frozen=True)
class ExportedSignatures:
    """Signatures exported on the caller's thread, ready to be written (possibly later)."""

    programs: dict[str, tuple[dict, dict, dict[str, torch.Tensor]]]

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        return {k: v for _, _, c in self.programs.values() for k, v in c.items()}

    def write(self, writer: ArtifactWriter) -> dict[str, Any]:
        """Write each program (and any program constants); return the manifest entries."""
        if self.constants:
            writer.write_tensors(CONSTANTS, self.constants)
        for program, entry, _ in self.programs.values():
            writer.write_json(entry["program"], program)
        return {name: entry for name, (_, entry, _) in self.programs.items()}


def export_signatures(obj: nn.Module, signatures: Any, input_spec: list[TensorSpec] | None = None,
                      output_names: Sequence[str] | None = None) -> ExportedSignatures:
    """Export every signature with ``torch.export`` (on the caller's thread: it reads the model).

    Raises:
        SaveError: a signature name that is not a plain file name, or a signature that cannot
            be exported (the message says which and why).
    """
    spec = input_spec or getattr(obj, "input_spec", None)
    resolved = _resolve_signatures(obj, signatures, spec, output_names)
    return ExportedSignatures({name: _prepare(obj, name, sig) for name, sig in resolved.items()})


def write_signatures(writer: ArtifactWriter, obj: nn.Module, signatures: Any,
                     input_spec: list[TensorSpec] | None = None,
                     output_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Export every signature and write it with ``writer``; return the manifest entries."""
    return export_signatures(obj, signatures, input_spec, output_names).write(writer)
