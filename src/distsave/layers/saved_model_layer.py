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
        """Rebuild the layer from its architecture entry, with zero weights to be loaded."""
        try:
            state = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"]))
                     for k, v in spec["state"].items()}
            inputs = [TensorSpec.from_json(s) for s in spec["inputs"]]
            program = build_program(spec["program"], state, {}, f"SavedModelLayer {spec['config']['signature']!r}")
            loaded = saved_model.LoadedModel(
                {"input_spec": None},
                {spec["config"]["signature"]: saved_model.ConcreteSignature(
                    spec["config"]["signature"], program, inputs, list(spec["outputs"]))},
                {}, {spec["config"]["signature"]: spec["program"]})
            return cls(loaded, **spec["config"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ArtifactError(f"Malformed SavedModelLayer entry in the architecture: {error!r}.") from None


register_special(_SPEC_CLASS, SavedModelLayer.from_spec)
