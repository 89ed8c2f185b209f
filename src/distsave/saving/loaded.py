"""Signatures, runtime side: what `load` returns and how a loaded program is called.

`load` reads an artifact through one `Snapshot` (every file checked, read once), rebuilds each
signature's program from its checked JSON and gives every signature the same variable tensors,
so fine-tuning one (as a `SavedModelLayer`) updates all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..strategies import get_strategy
from ..training.specs import TensorSpec, describe_tensor
from .errors import ArtifactError
from .format import CONSTANTS, MAX_PROGRAM_BYTES, WEIGHTS, index_file, single_file
from .program import build_program
from .snapshot import Snapshot
from .storage import download_artifact, is_remote, local_path

__all__ = ["ConcreteSignature", "LoadedModel", "load"]


class ConcreteSignature:
    """A loaded signature: call with tensors (positional or by input name); get named outputs.

    Its program was checked and built into a ``torch.fx.GraphModule`` once, at load; a call
    only matches the inputs against their specs and runs the module's generated code.
    """

    def __init__(self, name: str, module: nn.Module, inputs: list[TensorSpec], outputs: list[str]):
        self.name, self.module, self.inputs, self.output_names = name, module, inputs, outputs
        self._input_names = [s.name for s in inputs]

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        return f"<signature {self.name}({ins}) -> {{{', '.join(self.output_names)}}}>"

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        for tensor in self.module.buffers():
            return tensor.device
        return torch.device("cpu")

    def _expected(self) -> str:
        return ", ".join(s.describe() for s in self.inputs)

    def _bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if len(args) > len(self.inputs):
            raise TypeError(f"Signature {self.name!r} takes {len(self.inputs)} input(s) ({self._expected()}); "
                            f"received {len(args)} positional arguments.")
        values = list(args)
        if kwargs:
            bound = dict(zip(self._input_names, args))
            for key, value in kwargs.items():
                if key in bound or key not in self._input_names:
                    raise TypeError(f"Signature {self.name!r} has no input {key!r} (or it was given twice). "
                                    f"Inputs: ({self._expected()}).")
                bound[key] = value
            values = [bound.get(name, _MISSING) for name in self._input_names]
        if len(values) < len(self.inputs) or any(v is _MISSING for v in values):
            missing = next(s.name for i, s in enumerate(self.inputs) if i >= len(values) or values[i] is _MISSING)
            raise TypeError(f"Signature {self.name!r} is missing input {missing!r}. Inputs: ({self._expected()}).")
        tensors = []
        for spec, value in zip(self.inputs, values):
            value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
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


_MISSING = object()


class Signatures(dict):
    """Signatures by name; a missing name's `KeyError` lists the ones there are."""

    def __missing__(self, name: str) -> ConcreteSignature:
        available = ", ".join(map(repr, self)) or "none (the artifact was saved without signatures)"
        raise KeyError(f"No signature {name!r} in this artifact. Available: {available}.")


class LoadedModel:
    """What `load` returns: ``signatures``, shared ``variables``, and the saved specs."""

    def __init__(self, manifest: dict[str, Any], signatures: dict[str, ConcreteSignature],
                 variables: dict[str, torch.Tensor], programs: dict[str, dict[str, Any]]):
        self.manifest = manifest
        self.programs = programs
        self.signatures = Signatures(signatures)
        self.variables = variables
        self.input_spec = (None if manifest.get("input_spec") is None
                           else [TensorSpec.from_json(s) for s in manifest["input_spec"]])

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run ``serving_default`` (as ``loaded.signatures["serving_default"](...)``)."""
        return self.signatures["serving_default"](*args, **kwargs)

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
            if target not in current:
                raise ArtifactError(f"Signature {name!r} lists state {target!r}, which its program "
                                    "does not have; the artifact is inconsistent.")
            if var in claimed:
                _set_state(module, target, shared[var])
            else:
                shared[var] = current[target]
                claimed.add(var)
    return shared


def load(path: str | os.PathLike) -> LoadedModel:
    """Load signatures and variables from a directory written by `save` or ``model.save``.

    Nothing from the artifact is imported or unpickled; every file is checked against its
    checksums and every program's names and operators against the allowlists before torch
    builds it. Inside a strategy's scope the signatures run on its device.

    Raises:
        ArtifactError: corrupted, altered or hostile content (the message names the file).

    Example:
        >>> loaded = distsave.saved_model.load("exported")
        >>> loaded.signatures["serving_default"](images)["output_0"].shape
        torch.Size([64, 10])
    """
    if is_remote(path):
        with download_artifact(os.fspath(path)) as local:
            return load(local)
    with Snapshot.open(local_path(path)) as snapshot, snapshot.damage_first():
        manifest = snapshot.manifest
        variables = _read_stem(snapshot, WEIGHTS)
        constants = _read_stem(snapshot, CONSTANTS)
        modules, programs = {}, {}
        for name, entry in manifest["signatures"].items():
            programs[name] = snapshot.read_json(entry["program"], MAX_PROGRAM_BYTES)
            missing = [v for v in entry["state"].values() if v not in variables]
            missing += [v for v in entry["constants"].values() if v not in constants]
            if missing:
                raise ArtifactError(f"{snapshot.root / entry['program']} refers to tensors the artifact "
                                    f"lacks: {missing[:5]}.")
            state = {t: variables[v] for t, v in entry["state"].items()}
            consts = {c: constants[k] for c, k in entry["constants"].items()}
            modules[name] = build_program(programs[name], state, consts, str(snapshot.root / entry["program"]))
        snapshot.verify_remaining()
    device = get_strategy().device
    modules = {name: module.to(device) for name, module in modules.items()}
    shared = _shared_state(modules, manifest["signatures"], variables)
    signatures = {name: ConcreteSignature(name, module,
                                          [TensorSpec.from_json(s) for s in manifest["signatures"][name]["inputs"]],
                                          list(manifest["signatures"][name]["outputs"]))
                  for name, module in modules.items()}
    return LoadedModel(manifest, signatures, shared, programs)


def _read_stem(snapshot: Snapshot, stem: str) -> dict[str, torch.Tensor]:
    if not (snapshot.has(single_file(stem)) or snapshot.has(index_file(stem))):
        return {}
    return snapshot.allocate_and_read(stem)
