"""SavedModelLayer: a loaded signature as a (trainable) layer of a new model, as hub.KerasLayer."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..saving import saved_model
from ..saving.architecture import register_special
from ..saving.errors import ArtifactError, SaveError
from ..saving.program import build_program
from ..training.specs import TensorSpec

__all__ = ["SavedModelLayer"]

_SPEC_CLASS = "distsave.SavedModelLayer"


class SavedModelLayer(nn.Module):
    """Use a signature of a saved model as an ``nn.Module`` inside `Sequential` or `Model`.

    Args:
        loaded: What `distsave.saved_model.load` returned, or the artifact's path.
        signature: Which signature to call.
        output_key: Which named output to return; default: the only output, else the dict.
        trainable: Whether its weights receive gradients and are fine-tuned by ``fit``.

    Raises:
        ValueError: unknown signature or output key (the message lists the available ones).

    Example:
        >>> features = SavedModelLayer(distsave.saved_model.load("exported"), signature="embed")
        >>> model = distsave.Sequential([features, nn.Linear(64, 10)])
    """

    def __init__(self, loaded: saved_model.LoadedModel | str | os.PathLike,
                 signature: str = saved_model.DEFAULT_SIGNATURE, output_key: str | None = None,
                 trainable: bool = True):
        super().__init__()
        if not isinstance(loaded, saved_model.LoadedModel):
            loaded = saved_model.load(loaded)
        if signature not in loaded.signatures:
            raise ValueError(f"Unknown signature {signature!r}. The saved model has: "
                             f"{sorted(loaded.signatures)}.")
        concrete = loaded.signatures[signature]
        if output_key is not None and output_key not in concrete.output_names:
            raise ValueError(f"Signature {signature!r} has no output {output_key!r}. Outputs: "
                             f"{concrete.output_names}.")
        self.program = concrete.module
        self.signature, self.output_key, self.trainable = signature, output_key, trainable
        self._program_json = loaded.programs[signature]
        self._concrete = saved_model.ConcreteSignature(signature, self.program, concrete.inputs,
                                                       concrete.output_names)
        for parameter in self.program.parameters():
            parameter.requires_grad_(trainable and parameter.is_floating_point())

    def train(self, mode: bool = True) -> SavedModelLayer:
        """Record the mode only: the program was exported in eval mode and runs as such
        (dropout off, batch-norm statistics frozen), whether or not its weights train."""
        self.training = mode
        return self

    def forward(self, *args: torch.Tensor) -> Any:
        outputs = self._concrete(*args)
        if self.output_key is not None:
            return outputs[self.output_key]
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    def distsave_spec(self) -> dict[str, Any]:
        """The layer's architecture entry: its program and the shapes of its state."""
        state = self.program.state_dict()
        named = set(dict(self.program.named_parameters())) | set(dict(self.program.named_buffers()))
        if set(state) != named:
            raise SaveError(f"SavedModelLayer {self.signature!r} holds tensors outside its state; "
                            "save the outer model with distsave.saved_model.save instead.")
        return {"class": _SPEC_CLASS,
                "config": {"signature": self.signature, "output_key": self.output_key,
                           "trainable": self.trainable},
                "inputs": [s.to_json() for s in self._concrete.inputs],
                "outputs": self._concrete.output_names,
                "state": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in state.items()},
                "program": self._program_json}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], context: Any = None) -> SavedModelLayer:
        """Rebuild the layer from its architecture entry, its state left unfilled.

        State tensors are created with ``torch.empty`` on the current default device: under
        ``torch.device("meta")`` (as ``load_model`` builds) nothing is allocated from the shapes
        in the file; ``to_empty`` and an in-place copy of the weights then fill the program.

        Raises:
            ArtifactError: a field of the entry has the wrong type (the message names it), or
                the program is refused or broken.
        """
        where = "SavedModelLayer entry in the architecture"
        entry = _Entry(spec, where)
        config = entry.object("config", {"signature": str, "output_key": (str, type(None)),
                                         "trainable": bool})
        signature = config["signature"]
        inputs = entry.tensor_specs("inputs")
        outputs = entry.strings("outputs")
        state = {path: _empty(entry.field(f"state.{path}"), shape, dtype)
                 for path, (shape, dtype) in entry.state("state").items()}
        program_json = spec.get("program")
        if not isinstance(program_json, dict):
            raise ArtifactError(f"{entry.field('program')}: expected the program as a JSON object.")
        program = build_program(program_json, state, {}, f"SavedModelLayer {signature!r}")
        loaded = saved_model.LoadedModel(
            {"input_spec": None},
            {signature: saved_model.ConcreteSignature(signature, program, inputs, outputs)},
            {}, {signature: program_json})
        try:
            return cls(loaded, **config)
        except ValueError as error:
            raise ArtifactError(f"{where}: {error}") from None


def _empty(where: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype)
    except RuntimeError as error:
        raise ArtifactError(f"{where}: cannot hold a tensor of shape {shape}: {error}") from None


class _Entry:
    """Typed reads of a SavedModelLayer architecture entry; each failure names its field."""

    def __init__(self, spec: Any, where: str):
        if not isinstance(spec, dict):
            raise ArtifactError(f"{where}: expected a JSON object, received {type(spec).__name__}.")
        self.spec, self.where = spec, where

    def field(self, name: str) -> str:
        return f"{self.where}, field {name!r}"

    def fail(self, name: str, expected: str, received: Any) -> ArtifactError:
        return ArtifactError(f"{self.field(name)}: expected {expected}, received {received!r:.200}. "
                             "The architecture was altered; save the model again.")

    def object(self, name: str, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
        value = self.spec.get(name)
        if not isinstance(value, dict) or set(value) != set(fields):
            raise self.fail(name, f"an object with exactly the keys {sorted(fields)}", value)
        for key, kind in fields.items():
            if not isinstance(value[key], kind):
                expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise self.fail(f"{name}.{key}", expected, value[key])
        return value

    def strings(self, name: str) -> list[str]:
        value = self.spec.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "a list of strings", value)
        return list(value)

    def tensor_specs(self, name: str) -> list[TensorSpec]:
        value = self.spec.get(name)
        if not isinstance(value, list):
            raise self.fail(name, "a list of tensor specs", value)
        specs = []
        for i, item in enumerate(value):
            if (not isinstance(item, dict) or set(item) - {"shape", "dtype", "name"}
                    or not isinstance(item.get("shape"), list)
                    or not all(d is None or _is_size(d) for d in item["shape"])
                    or not _is_dtype(item.get("dtype")) or not isinstance(item.get("name", "x"), str)):
                raise self.fail(f"{name}[{i}]", "{'shape': [int or null, ...], 'dtype': 'float32', "
                                "'name': str}", item)
            specs.append(TensorSpec.from_json(item))
        return specs

    def state(self, name: str) -> dict[str, tuple[list[int], torch.dtype]]:
        value = self.spec.get(name)
        if not isinstance(value, dict):
            raise self.fail(name, "an object of {path: {'shape', 'dtype'}}", value)
        state = {}
        for path, item in value.items():
            if (not isinstance(item, dict) or set(item) != {"shape", "dtype"}
                    or not isinstance(item["shape"], list) or not all(map(_is_size, item["shape"]))
                    or not _is_dtype(item["dtype"])):
                raise self.fail(f"{name}.{path}", "{'shape': [int, ...], 'dtype': 'float32'}", item)
            state[path] = (item["shape"], _DTYPES[item["dtype"]])
        return state


def _is_size(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**62


def _is_dtype(value: Any) -> bool:
    return isinstance(value, str) and value in _DTYPES


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


register_special(_SPEC_CLASS, SavedModelLayer.from_spec)
