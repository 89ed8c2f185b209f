"""Low-level save and load with named signatures, as ``tf.saved_model``.

``saved_model.save`` writes the weights once (``model.safetensors``), one JSON program per
signature (``signatures/<name>.json``) and any program constants (``constants.safetensors``).
``saved_model.load`` needs none of the user's code: it returns an object whose
``signatures[name]`` take tensors and return a dict of named output tensors.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..strategies import get_strategy
from ..training.model import Model
from ..training.specs import TensorSpec, describe_tensor
from .architecture import module_spec
from .errors import ArtifactError, SaveError
from .manifest import read_json_object, read_manifest, write_manifest
from .model_format import WEIGHTS, write_on_chief
from .program import build_program, export_program
from .tensors import read_tensors, write_tensors

__all__ = ["DEFAULT_SIGNATURE", "ConcreteSignature", "LoadedModel", "Signature", "load", "save"]

DEFAULT_SIGNATURE = "serving_default"
SIGNATURES_DIR = "signatures"
CONSTANTS = "constants"
KIND_SAVED_MODEL = "saved_model"
_MAX_PROGRAM_BYTES = 256 * 2**20


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
    """A CPU copy in eval mode for export. The live training wrapper and optimizer are left
    out; the strategy (process groups cannot be copied) and datasets kept on the device are
    shared, not copied."""
    memo: dict[int, Any] = {}
    for attr, replacement in (("_train_module", None), ("optimizer", None), ("_strategy", "same"),
                              ("_device_tables", "same")):
        value = module.__dict__.get(attr)
        if value is not None and value is not module:
            memo[id(value)] = value if replacement == "same" else None
    return copy.deepcopy(module, memo).cpu().eval()


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
        resolved[str(name)] = Signature(sig.fn, list(spec), sig.output_names or (
            output_names if sig.fn is obj else None))
    return resolved


@contextlib.contextmanager
def _exportable(obj: nn.Module, fn: Callable) -> Iterator[nn.Module]:
    """A CPU module in eval mode whose forward is ``fn``; ``obj`` itself is left as it was.

    A CPU model is exported in place (so functions that close over it see its parameters);
    a GPU model through a CPU copy, where only the model and its methods can be exported.
    """
    if all(t.device.type == "cpu" for t in obj.state_dict().values()):
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
    examples = tuple(s.example(2) for s in sig.input_spec)
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
    entry = {"program": f"{SIGNATURES_DIR}/{name}.json",
             "inputs": [s.to_json() for s in sig.input_spec],
             "outputs": outputs,
             "state": {t: t.removeprefix(prefix) for t in state_targets},
             "constants": {c: f"{name}/{c}" for c in constants}}
    return program, entry, {f"{name}/{c}": t for c, t in constants.items()}


def write_signatures(staging: Path, obj: nn.Module, signatures: Any, *, weights_written: bool,
                     input_spec: list[TensorSpec] | None = None,
                     output_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Export and write every signature into ``staging``; return their manifest entries."""
    spec = input_spec or getattr(obj, "input_spec", None)
    resolved = _resolve_signatures(obj, signatures, spec, output_names)
    prepared = {name: _prepare(obj, name, sig) for name, sig in resolved.items()}
    if not weights_written:
        write_tensors(staging, WEIGHTS, obj.state_dict())
    constants = {k: v for _, _, c in prepared.values() for k, v in c.items()}
    if constants:
        write_tensors(staging, CONSTANTS, constants)
    if prepared:
        (staging / SIGNATURES_DIR).mkdir()
    for name, (program, entry, _) in prepared.items():
        (staging / entry["program"]).write_text(json.dumps(program, separators=(",", ":")))
    return {name: entry for name, (_, entry, _) in prepared.items()}


def save(obj: nn.Module, path: str | os.PathLike, signatures: Any = None, *,
         input_spec: TensorSpec | Sequence[TensorSpec] | None = None,
         example_inputs: Sequence[torch.Tensor] | None = None,
         output_names: Sequence[str] | None = None) -> None:
    """Save weights and code-free signature programs, loadable without the model's code.

    Args:
        obj: A distsave `Model` or any ``nn.Module``.
        path: The directory to write (replaced atomically if it is a distsave artifact).
        signatures: None for ``serving_default`` from the input spec (none if it is unknown:
            weights and structure only); a callable; or ``{name: callable or Signature}``.
        input_spec: The inputs, when ``obj`` cannot tell them; the batch dimension is dynamic.
        example_inputs: Example tensors to take the input spec from instead.
        output_names: Names for ``serving_default``'s outputs.

    Raises:
        SaveError: a signature cannot be exported or uses an operator outside the allowlist.

    Example:
        >>> distsave.saved_model.save(model, "exported", signatures={
        ...     "serving_default": model, "embed": Signature(model.embed)})
    """
    obj = unwrap(obj)
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in obj.parameters()):
        raise SaveError(f"{type(obj).__name__} has lazy layers whose weights do not exist yet. Call "
                        "the model once on a batch (or give it an input_spec and call it) first.")
    spec = [input_spec] if isinstance(input_spec, TensorSpec) else (list(input_spec) if input_spec else None)
    if spec is None and example_inputs is not None:
        spec = [TensorSpec.from_tensor(t, f"input_{i}" if len(example_inputs) > 1 else "x")
                for i, t in enumerate(example_inputs)]
    try:
        architecture = module_spec(obj)
    except SaveError:
        architecture = None  # structure recorded as tensor names only; signatures still work
    strategy = obj.distribute_strategy if isinstance(obj, Model) else get_strategy()
    spec = spec or getattr(obj, "input_spec", None)

    def write(staging: Path) -> None:
        entries = write_signatures(staging, obj, signatures, weights_written=False,
                                   input_spec=spec, output_names=output_names)
        write_manifest(staging, {
            "kind": KIND_SAVED_MODEL, "architecture": architecture,
            "input_spec": None if spec is None else [s.to_json() for s in spec],
            "parameter_count": sum(p.numel() for p in obj.parameters()),
            "variables": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in obj.state_dict().items()},
            "signatures": entries,
        })

    write_on_chief(strategy, path, write)


class ConcreteSignature:
    """A loaded signature: call with tensors (positional or by input name); get named outputs."""

    def __init__(self, name: str, module: nn.Module, inputs: list[TensorSpec], outputs: list[str]):
        self.name, self.module, self.inputs, self.output_names = name, module, inputs, outputs

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        return f"<signature {self.name}({ins}) -> {{{', '.join(self.output_names)}}}>"

    @property
    def device(self) -> torch.device:
        for tensor in self.module.state_dict().values():
            return tensor.device
        return torch.device("cpu")

    def _bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        expected = ", ".join(s.describe() for s in self.inputs)
        if len(args) > len(self.inputs):
            raise TypeError(f"Signature {self.name!r} takes {len(self.inputs)} input(s) ({expected}); "
                            f"received {len(args)} positional arguments.")
        bound = dict(zip((s.name for s in self.inputs), args))
        for key, value in kwargs.items():
            if key in bound or key not in {s.name for s in self.inputs}:
                raise TypeError(f"Signature {self.name!r} has no input {key!r} (or it was given twice). "
                                f"Inputs: ({expected}).")
            bound[key] = value
        tensors = []
        for spec in self.inputs:
            if spec.name not in bound:
                raise TypeError(f"Signature {self.name!r} is missing input {spec.name!r}. Inputs: ({expected}).")
            value = bound[spec.name]
            value = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
            if not spec.matches(value):
                raise ValueError(f"Signature {self.name!r} expects {spec.describe()}; received "
                                 f"{describe_tensor(value)}. Cast or reshape the input to match.")
            tensors.append(value)
        return tensors

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        device = self.device
        out = self.module(*[t.to(device) for t in self._bind(args, kwargs)])
        if isinstance(out, Mapping):
            values = list(out.values())
        elif isinstance(out, torch.Tensor):
            values = [out]
        else:
            values = list(out)
        return dict(zip(self.output_names, values))


class LoadedModel:
    """What `load` returns: ``signatures``, shared ``variables``, and the saved specs."""

    def __init__(self, manifest: dict[str, Any], signatures: dict[str, ConcreteSignature],
                 variables: dict[str, torch.Tensor], programs: dict[str, dict[str, Any]]):
        self.manifest = manifest
        self.programs = programs
        self.signatures = signatures
        self.variables = variables
        self.input_spec = (None if manifest.get("input_spec") is None
                           else [TensorSpec.from_json(s) for s in manifest["input_spec"]])

    @property
    def trainable_variables(self) -> list[nn.Parameter]:
        return [v for v in self.variables.values() if isinstance(v, nn.Parameter)]

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move every signature and variable to ``device``; returns self."""
        for sig in self.signatures.values():
            sig.module.to(device)
        self.variables = _shared_state({n: s.module for n, s in self.signatures.items()},
                                       self.manifest["signatures"],
                                       {k: v.to(device) for k, v in self.variables.items()})
        return self

    def __repr__(self) -> str:
        return f"<LoadedModel signatures={list(self.signatures)} variables={len(self.variables)}>"


def _set_state(module: nn.Module, target: str, value: torch.Tensor) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = module.get_submodule(owner_path)
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def _shared_state(modules: dict[str, nn.Module], entries: dict[str, Any],
                  variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every signature use one tensor per variable (so fine-tuning one updates all)."""
    shared, claimed = dict(variables), set()
    for name, module in modules.items():
        current = {**dict(module.named_buffers(remove_duplicate=False)),
                   **dict(module.named_parameters(remove_duplicate=False))}
        for target, var in entries[name]["state"].items():
            if var in claimed:
                _set_state(module, target, shared[var])
            else:
                shared[var] = current[target]
                claimed.add(var)
    return shared


def load(path: str | os.PathLike) -> LoadedModel:
    """Load signatures and variables from a directory written by `save` or ``model.save``.

    Nothing from the artifact is imported or unpickled; every operator in every program is
    checked against the allowlist first. Inside a strategy's scope the signatures run on its
    device.

    Raises:
        ArtifactError: corrupted, altered or hostile content (the message names the file).

    Example:
        >>> loaded = distsave.saved_model.load("exported")
        >>> loaded.signatures["serving_default"](images)["output_0"].shape
        torch.Size([64, 10])
    """
    root = Path(path)
    manifest = read_manifest(root)
    variables = read_tensors(root, WEIGHTS)
    has_constants = any(name.startswith(CONSTANTS) for name in manifest["files"])
    constants = read_tensors(root, CONSTANTS) if has_constants else {}
    modules, programs = {}, {}
    for name, entry in manifest.get("signatures", {}).items():
        program = programs[name] = read_json_object(root / entry["program"], _MAX_PROGRAM_BYTES,
                                                    "JSON program")
        missing = [v for v in list(entry["state"].values()) + list(entry["constants"].values())
                   if v not in variables and v not in constants]
        if missing:
            raise ArtifactError(f"{entry['program']} refers to tensors the artifact lacks: {missing[:5]}.")
        state = {t: variables[v] for t, v in entry["state"].items()}
        consts = {c: constants[k] for c, k in entry["constants"].items()}
        modules[name] = build_program(program, state, consts, entry["program"]).to(get_strategy().device)
    shared = _shared_state(modules, manifest.get("signatures", {}), variables)
    signatures = {name: ConcreteSignature(name, module,
                                          [TensorSpec.from_json(s) for s in manifest["signatures"][name]["inputs"]],
                                          list(manifest["signatures"][name]["outputs"]))
                  for name, module in modules.items()}
    return LoadedModel(manifest, signatures, shared, programs)
