"""High-level save and load: ``model.save(path)`` and ``distsave.load_model(path)``.

A model directory holds ``manifest.json`` (architecture, compile config, optimizer
hyperparameters, training state, checksums), ``model.safetensors`` (weights, sharded with an
index when ``max_shard_size`` asks) and ``optimizer.safetensors`` (optimizer state tensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..strategies import Strategy, get_strategy, has_strategy
from ..training.model import Model
from ..training.specs import TensorSpec
from .architecture import build_module, module_spec
from .atomic import atomic_directory
from .compile_config import compile_to_json, optimizer_state, restore_compile
from .errors import ArtifactError, SaveError
from .manifest import is_artifact, read_manifest, write_manifest
from .tensors import read_tensors, write_tensors

__all__ = ["WEIGHTS", "OPTIMIZER", "save_model", "load_model", "load_weights", "write_on_chief"]

WEIGHTS = "model"
OPTIMIZER = "optimizer"
KIND_MODEL = "model"

_NO_INPUTS = (
    "{name} cannot be saved yet: its inputs are not known, so its architecture and serving "
    "signature cannot be recorded. Do one of: (1) give them, {name}(..., input_spec="
    "distsave.TensorSpec((None, 1, 28, 28), 'float32')) or model.input_spec = [...]; (2) call the "
    "model once on a batch, model(x); (3) train it with model.fit(...). To save weights and "
    "structure without signatures now, use distsave.saved_model.save(model, path)."
)


def materialize(model: nn.Module, specs: list[TensorSpec] | None) -> None:
    """Give lazy layers their shapes by one call on zeros of the input spec."""
    if specs and any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        device = next(iter([*model.parameters(), *model.buffers()])).device
        was_training = model.training
        with torch.no_grad():
            model.eval()(*[s.example(2).to(device) for s in specs])
        model.train(was_training)


def write_on_chief(strategy: Strategy, path: str | os.PathLike, write: Any) -> None:
    """Run ``write(staging_dir)`` on the chief inside an atomic write; every replica returns
    only after the artifact is complete, and all raise if the chief failed."""
    failure: BaseException | None = None
    if strategy.is_chief:
        try:
            with atomic_directory(path, is_ours=is_artifact) as staging:
                write(staging)
        except Exception as error:  # re-raised below, after the other replicas are told
            failure = error
    message = strategy.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise SaveError(f"Replica 0 failed to write '{path}': {message}")


def save_model(model: Model, path: str | os.PathLike, *, max_shard_size: int | None = None) -> None:
    """Write ``model`` as a distsave model directory (see the module docstring).

    Call it on every replica (inside or outside a strategy's scope): the chief writes once,
    atomically, and every replica returns after the artifact is complete.

    Args:
        model: A distsave `Model` whose inputs are known.
        path: The directory to write; an existing distsave artifact there is replaced atomically.
        max_shard_size: Split weights into safetensors shards of at most this many bytes.

    Raises:
        SaveError: inputs unknown, a layer that cannot be recorded, or a failed write (the
            previous artifact is kept).
    """
    if not isinstance(model, Model):
        raise TypeError(f"Expected a distsave.Model. Received: {type(model).__name__}. Wrap an "
                        "nn.Module with distsave.Model(module, input_spec=...).")
    if model.input_spec is None:
        raise SaveError(_NO_INPUTS.format(name=type(model).__name__))
    materialize(model, model.input_spec)
    architecture = module_spec(model)
    _check_rebuilds(architecture, model)
    compile_config = compile_to_json(model)
    state_tensors, state_scalars = optimizer_state(model) if model.compiled else ({}, {})
    strategy = model.distribute_strategy
    content = {
        "kind": KIND_MODEL,
        "architecture": architecture,
        "input_spec": [s.to_json() for s in model.input_spec],
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "compile": compile_config,
        "optimizer_state": state_scalars,
        "training_state": {"epoch": model.epoch, "step": model.step},
        "trained_under": strategy.describe(),
    }

    def write(staging: Path) -> None:
        from .saved_model import write_signatures  # the serving program, for the mixed API

        write_tensors(staging, WEIGHTS, model.state_dict(), max_shard_size)
        if state_tensors:
            write_tensors(staging, OPTIMIZER, state_tensors)
        signatures = write_signatures(staging, model, None, weights_written=True)
        write_manifest(staging, {**content, "signatures": signatures})

    write_on_chief(strategy, path, write)


def _check_rebuilds(architecture: dict[str, Any], model: Model) -> None:
    rebuilt = build_module(architecture, context=None)
    materialize(rebuilt, model.input_spec)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if mine != theirs:
        differing = sorted(set(mine.items()) ^ set(theirs.items()))[:5]
        raise SaveError(f"The recorded architecture of {type(model).__name__} does not rebuild the "
                        f"same weights (differences: {differing}). A layer's constructor arguments "
                        "were not captured; give its class a get_config() and register it.")


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``module``; report every missing, unexpected or misshapen name."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in own]
    problems += [f"{k}: file has {tuple(t.shape)}, model has {tuple(own[k].shape)}"
                 for k, t in tensors.items() if k in own and t.shape != own[k].shape]
    if problems:
        raise ArtifactError(f"Weights in {source} do not fit the architecture: " + "; ".join(problems[:10]))
    module.load_state_dict(tensors)


def load_model(path: str | os.PathLike, *, compile: bool = True) -> Model:
    """Rebuild, fill and compile a model that ``model.save`` wrote.

    Built-in layers and registered classes are rebuilt from the manifest (nothing is imported or
    executed from the artifact). Inside a strategy's ``scope()`` the model is placed on its
    devices and trains under it; outside, it uses the default device.

    Args:
        path: The model directory.
        compile: Restore loss, metrics and optimizer state (default), so ``fit`` continues.

    Returns:
        The `Model`, with ``epoch`` and ``step`` as when saved.

    Raises:
        ArtifactError: the artifact is missing, corrupted, altered or names unknown classes.

    Example:
        >>> with distsave.OneDeviceStrategy("cpu").scope():
        ...     model = distsave.load_model("mnist_model")
    """
    root = Path(path)
    manifest = read_manifest(root)
    if manifest.get("kind") != KIND_MODEL:
        raise ArtifactError(f"'{root}' holds a {manifest.get('kind')!r} artifact written by "
                            "saved_model.save; load it with distsave.saved_model.load.")
    model = build_module(manifest["architecture"], context=root)
    if not isinstance(model, Model):
        raise ArtifactError(f"The architecture in '{root}' is not a distsave Model.")
    model.input_spec = [TensorSpec.from_json(s) for s in manifest["input_spec"]]
    materialize(model, model.input_spec)
    load_weights(model, read_tensors(root, WEIGHTS), str(root / f"{WEIGHTS}.safetensors"))
    strategy = get_strategy()
    model._strategy = strategy if has_strategy() else None
    model.to(strategy.device)
    if compile and manifest.get("compile"):
        optimizer_files = any(name.startswith(OPTIMIZER) for name in manifest["files"])
        restore_compile(model, manifest["compile"],
                        read_tensors(root, OPTIMIZER) if optimizer_files else {},
                        manifest.get("optimizer_state", {}))
    state = manifest.get("training_state", {})
    model.epoch, model.step = int(state.get("epoch", 0)), int(state.get("step", 0))
    return model
