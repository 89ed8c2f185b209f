"""Keras' ``save_weights`` / ``load_weights``: a model's ``state_dict`` as one safetensors file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["load_weights", "save_weights"]


def save_weights(model: Any, path: str | os.PathLike) -> None:
    """The chief writes ``state_dict`` as one safetensors file (a sibling renamed into place).

    Raises:
        SaveError: the file could not be written (every replica raises).
    """
    from ..saving.errors import SaveError  # saving builds on training, not the reverse

    path = Path(path)
    strategy = model.distribute_strategy
    failure = None
    if strategy.is_chief:
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(temporary), metadata={"format": "pt"})
            os.replace(temporary, path)
        except (OSError, RuntimeError) as error:
            temporary.unlink(missing_ok=True)
            failure = f"{type(error).__name__}: {error}"
    failure = strategy.broadcast_object(failure)
    if failure is not None:
        raise SaveError(f"Could not write the weights to '{path}': {failure}. Choose a writable path.")


def load_weights(model: Any, path: str | os.PathLike) -> None:
    """Copy the tensors of a `save_weights` file into ``model``, after checking that every name,
    shape and dtype matches (all problems reported at once; nothing is changed on a mismatch).

    Raises:
        ValueError: the file is not safetensors, or does not fit the model (listed).
    """
    try:
        stored = load_file(os.fspath(path))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"Expected a safetensors file written by save_weights at '{path}'. "
                         f"Could not read it: {error}.") from error
    state = model.state_dict()
    problems = [f"missing {name!r}" for name in state if name not in stored]
    problems += [f"unexpected {name!r}" for name in stored if name not in state]
    problems += [f"{name!r}: file {stored[name].dtype}{list(stored[name].shape)}, model "
                 f"{tensor.dtype}{list(tensor.shape)}" for name, tensor in state.items()
                 if name in stored and (stored[name].shape != tensor.shape or stored[name].dtype != tensor.dtype)]
    if problems:
        raise ValueError(f"The weights in '{path}' do not fit {type(model).__name__}: "
                         + "; ".join(problems) + ". Load them into the architecture that saved them.")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(stored[name])
