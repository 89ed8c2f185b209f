"""High-level save and load: ``model.save(path)`` and ``distsave.load_model(path)``.

A model directory holds ``manifest.json`` (architecture, compile config, optimizer
hyperparameters, training state, checksums), ``model.safetensors`` (weights; Hugging Face
shards with an index above ``max_shard_size``), ``optimizer.safetensors`` (optimizer state) and
the ``serving_default`` program, so the low-level API loads it too.

Loading builds the architecture on the ``meta`` device, compares every tensor's name, shape and
dtype with the safetensors headers, and only then allocates memory, on the target device, and
reads each file once straight into the model.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

import torch
from torch import nn

from ..strategies import Strategy, get_strategy, has_strategy
from ..training.model import Model
from ..training.specs import TensorSpec
from .architecture import build_module, module_spec
from .background import SaveHandle, stable_copies, wait_for_saves
from .commit import write_artifact, write_artifact_in_background
from .compile_config import compile_to_json, optimizer_state, restore_compile
from .errors import ArtifactError, SaveError
from .export_process import HelperExport, helper_modules
from .format import KIND_MODEL, MANIFEST, OPTIMIZER, WEIGHTS, index_file, single_file
from .manifest import ArtifactWriter
from .program_cache import entry_path, read_programs, store_programs
from .signatures import ExportedSignatures, export_signatures
from .slices import is_dtensor, local_slice
from .snapshot import Snapshot
from .storage import download_artifact, is_remote, local_path
from .tensor_io import TensorEntry

__all__ = ["save_model", "load_model", "materialize", "rebuild_on_meta"]

_NO_INPUTS = (
    "{name} cannot be saved yet: its inputs are not known, so its architecture and serving "
    "signature cannot be recorded. Do one of: (1) give them, {name}(..., input_spec="
    "distsave.TensorSpec((None, 1, 28, 28), 'float32')) or model.input_spec = [...]; (2) call the "
    "model once on a batch, model(x); (3) train it with model.fit(...). To save weights and "
    "structure without signatures now, use distsave.saved_model.save(model, path)."
)


def materialize(model: nn.Module, specs: list[TensorSpec] | None) -> None:
    """Give lazy layers their shapes by one call on zeros of the input spec, on the model's
    own device (``meta`` while loading, so nothing is allocated)."""
    lazy = [p for p in model.parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if not specs or not lazy:
        return
    device = lazy[0].device
    was_training = model.training
    with torch.no_grad():
        model.eval()(*[s.example(2, device) for s in specs])
    model.train(was_training)


def save_model(model: Model, path: str | os.PathLike, *, max_shard_size: int | None = None,
               blocking: bool = True) -> SaveHandle:
    """Write ``model`` as a distsave model directory (see the module docstring).

    Call it on every replica (inside or outside a strategy's scope): the chief writes once,
    atomically, and every replica returns after the artifact is complete.

    Args:
        model: A distsave `Model` whose inputs are known.
        path: The directory to write; an existing distsave artifact there is replaced atomically.
            An fsspec URL (``s3://bucket/run``) is written locally, then uploaded, manifest last.
        max_shard_size: Split weights into safetensors shards of at most this many bytes
            (default 4 GiB).
        blocking: False returns once the tensors are copied (on the GPU when it has room, else
            to host memory); the chief writes in a background thread (see
            `distsave.wait_for_saves`); training may go on meanwhile. A first save's serving
            program is exported by a helper process where one can rebuild the model.

    Returns:
        A `SaveHandle`; ``handle.result()`` waits for a background save and raises its error.

    Raises:
        SaveError: inputs unknown, a layer that cannot be recorded, a failed write (the previous
            artifact is kept), or the failure of an earlier background save.
    """
    if not isinstance(model, Model):
        raise TypeError(f"Expected a distsave.Model. Received: {type(model).__name__}. Wrap an "
                        "nn.Module with distsave.Model(module, input_spec=...).")
    if model.input_spec is None:
        raise SaveError(_NO_INPUTS.format(name=type(model).__name__))
    wait_for_saves()  # one save in flight at a time; an earlier failure surfaces here
    materialize(model, model.input_spec)
    architecture = module_spec(model)
    input_spec = [s.to_json() for s in model.input_spec]
    rebuilt = _check_rebuilds(architecture, model)
    strategy = model.distribute_strategy
    weights = model.state_dict()
    state_tensors, state_scalars = optimizer_state(model) if model.compiled else ({}, {})
    if not blocking and any(not local_slice(name, t)[2] for name, t in weights.items()):
        raise SaveError("model.save(blocking=False) needs the whole model on one replica; under "
                        "ShardedStrategy each replica holds 1/N and all write their rows together. "
                        "Save with blocking=True: the replicas write in parallel, straight to the files.")
    # A blocking save exports its program while the tensors are written. A background save
    # starts a helper process exporting it (or exports before it returns, while the model is as
    # saved, where a helper cannot rebuild the model), and so does a controller that forks its
    # replicas: torch.export initialises CUDA, after which forked replicas cannot use it.
    exported = None
    if strategy.is_chief and (not blocking or strategy.forks):
        exported = _export_serving(model, rebuilt, architecture, input_spec, in_helper=True)
    content = {
        "kind": KIND_MODEL,
        "architecture": architecture,
        "input_spec": input_spec,
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "compile": compile_to_json(model),
        "optimizer_state": state_scalars,
        "training_state": {"epoch": model.epoch, "step": model.step},
        "trained_under": strategy.describe(),
        "tied_parameters": _tied_parameters(model),
    }

    tensor_sets = {WEIGHTS: weights, **({OPTIMIZER: state_tensors} if state_tensors else {})}
    ready = None
    if not blocking and strategy.is_chief:  # the other replicas write nothing in the background
        tensor_sets, ready = stable_copies(model, tensor_sets)

    def write(writer: ArtifactWriter) -> dict[str, Any]:
        signatures = exported or _export_serving(model, rebuilt, architecture, input_spec)
        return {**content, "signatures": signatures.write(writer)}

    if not blocking:
        return write_artifact_in_background(strategy, path, write, tensor_sets, max_shard_size, ready)
    write_artifact(strategy, path, write, tensor_sets, max_shard_size)
    return SaveHandle(os.fspath(path))


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of names that share one parameter (tied weights), which the architecture does not
    record: each group is re-tied on load."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _tie(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            if model.get_parameter(other).shape != first.shape:
                raise ArtifactError(f"tied parameters {names[0]} and {other} differ in shape")
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)


# A model's serving program, by the architecture and inputs it was exported for: saving the same
# model again (checkpoints) reuses it, as programs hold no weights.
_SERVING_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _export_serving(model: Model, rebuilt: Model, architecture: dict[str, Any],
                    input_spec: list[dict[str, Any]], *, in_helper: bool = False
                    ) -> ExportedSignatures | HelperExport:
    """The ``serving_default`` program, exported from the ``meta`` rebuild of the model (no
    copy of the weights anywhere, whatever device the model is on), or from the model itself
    when its code cannot run on ``meta``: it keeps tensors as plain attributes (which have no
    values there), or it reads tensor values.

    A program of built-in layers another process exported comes from the `program_cache`.
    With ``in_helper``, a helper process exports the rebuild where one can rebuild the model
    (`export_process`), and this returns at once."""
    key = json.dumps([architecture, input_spec])
    cached = _SERVING_PROGRAMS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]

    on_meta = not any(isinstance(value, torch.Tensor) for module in rebuilt.modules()
                      for value in vars(module).values())
    entry = entry_path(architecture, input_spec) if on_meta else None

    def remember(exported: ExportedSignatures, from_rebuild: bool = True) -> None:
        _SERVING_PROGRAMS[model] = (key, exported)
        if from_rebuild:
            store_programs(entry, exported)

    stored = read_programs(entry)
    if stored is not None:
        remember(stored, from_rebuild=False)
        return stored
    modules = helper_modules(architecture) if on_meta and in_helper else None
    if modules is not None:
        return HelperExport(architecture, input_spec, modules, type(model).__name__, arrived=remember)
    exported, from_rebuild = None, False
    if on_meta:
        try:
            exported = export_signatures(rebuilt, None, model.input_spec)
            from_rebuild = not any(t.device.type == "meta" for t in exported.constants.values())
            if not from_rebuild:
                exported = None  # tensors held elsewhere than plain attributes (in a list, say)
        except (SaveError, RuntimeError, NotImplementedError):  # code that needs real values
            pass
    if exported is None:
        exported = export_signatures(model, None, model.input_spec)
    if not exported.constants:
        remember(exported, from_rebuild)
    return exported


def rebuild_on_meta(architecture: dict[str, Any], specs: list[TensorSpec] | None) -> Model:
    """The model an architecture describes, on the ``meta`` device (no memory), in eval mode."""
    with torch.device("meta"):
        rebuilt = build_module(architecture, context=None)
    materialize(rebuilt, specs)
    return rebuilt.eval()


def _check_rebuilds(architecture: dict[str, Any], model: Model) -> Model:
    """The recorded architecture must rebuild the same tensors (checked on ``meta``: free);
    returns the rebuild, in eval mode."""
    rebuilt = rebuild_on_meta(architecture, model.input_spec)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if mine != theirs:
        differing = sorted(set(mine.items()) ^ set(theirs.items()))[:5]
        raise SaveError(f"The recorded architecture of {type(model).__name__} does not rebuild the "
                        f"same weights (differences: {differing}). A layer's constructor arguments "
                        "were not captured; give its class a get_config() and register it.")
    return rebuilt


def load_model(path: str | os.PathLike, *, compile: bool = True, mmap: bool = True) -> Model:
    """Rebuild, fill and compile a model that ``model.save`` wrote.

    Built-in layers and registered classes are rebuilt from the manifest (nothing is imported or
    executed from the artifact), on the ``meta`` device first, so a file whose tensors do not
    fit the architecture is refused before any memory is allocated. Inside a strategy's
    ``scope()`` the model is placed on its device and trains under it; outside, it uses the
    default device. Floating-point tensors keep the dtype they were saved in.

    Args:
        path: The model directory, or an fsspec URL (``s3://…``; downloaded, then checked).
        compile: Restore loss, metrics and optimizer state (default), so ``fit`` continues.
        mmap: On the CPU, keep the tensors on a private mapping of the checked files (default,
            as ``safetensors`` does): no copy, and processes loading one artifact share its
            pages until they write. The files must then not be rewritten in place while the
            model lives (distsave's saves never do; a file cut short under the mapping ends the
            process with SIGBUS). ``False`` reads into memory of the model's own, as do
            loads onto a GPU, of sharded models, and of remote artifacts (the download is removed).

    Returns:
        The `Model` in eval mode (call it for inference; `fit` trains and puts the mode back),
        with ``epoch`` and ``step`` as when saved.

    Raises:
        ArtifactError: the artifact is missing, corrupted, altered, hostile or names unknown
            classes (the message names the file and the field).

    Example:
        >>> with distsave.OneDeviceStrategy("cpu").scope():
        ...     model = distsave.load_model("mnist_model")
    """
    if is_remote(path):
        with download_artifact(os.fspath(path)) as local:
            return load_model(local, compile=compile, mmap=False)
    strategy = get_strategy()
    if not has_strategy() or strategy.num_replicas_in_sync == 1:
        return _load(path, strategy, compile, mmap)
    failure, model = None, None
    try:
        model = _load(path, strategy, compile, mmap)
    except Exception as error:  # every replica is told below, so none waits for the others
        failure = error
    reports = strategy.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [f"replica {r}: {report}" for r, report in enumerate(reports) if report is not None]
    if failed:
        raise ArtifactError(f"Loading '{path}' failed on another replica: " + "; ".join(failed))
    return model


def _load(path: str | os.PathLike, strategy: Strategy, compile: bool, mmap: bool) -> Model:
    with Snapshot.open(local_path(path)) as snapshot, snapshot.damage_first():
        manifest = snapshot.manifest
        where = str(snapshot.root / MANIFEST)
        if manifest["kind"] != KIND_MODEL:
            raise ArtifactError(f"'{snapshot.root}' holds a {manifest['kind']!r} artifact written by "
                                "saved_model.save; load it with distsave.saved_model.load.")
        specs = [TensorSpec.from_json(s) for s in manifest["input_spec"]]
        model = _build_on_meta(manifest["architecture"], specs, where, snapshot.root)
        _rebuilding(where, "tied_parameters", lambda: _tie(model, manifest["tied_parameters"]))
        _adopt_stored_dtypes(model, snapshot.tensor_files(WEIGHTS), str(snapshot.root / single_file(WEIGHTS)))
        strategy.apply_sharding(model)
        restore = compile and manifest.get("compile") is not None
        if mmap and _can_map(model, strategy.device):
            optimizer_tensors = _map_into_place(snapshot, model, restore)
        else:
            _allocate(model, strategy.device)
            optimizer_tensors = _optimizer_state_memory(snapshot, model, strategy.device) if restore else {}
            _read_into_place(snapshot, {WEIGHTS: {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()},
                                       **({OPTIMIZER: optimizer_tensors} if optimizer_tensors else {})})
        snapshot.verify_remaining()
    model.input_spec = specs
    model.runtime.strategy = strategy if has_strategy() else None
    model.runtime.replicas_synced = True  # every replica read the same file: nothing to broadcast
    if restore:
        _rebuilding(where, "compile", lambda: restore_compile(
            model, manifest["compile"], optimizer_tensors, manifest.get("optimizer_state", {})))
    state = manifest.get("training_state", {})
    model.epoch, model.step = state.get("epoch", 0), state.get("step", 0)
    return model.eval()  # inference, as Keras' model(x); fit switches to training and back


def _rebuilding(where: str, field: str, build: Any) -> Any:
    """Run ``build``; any failure is the artifact's, reported as `ArtifactError` naming the field."""
    try:
        return build()
    except ArtifactError:
        raise
    except Exception as error:  # a hostile or damaged entry may fail anywhere in a constructor
        raise ArtifactError(f"{where}: field '{field}' could not be rebuilt ({type(error).__name__}: "
                            f"{error}). The artifact is damaged, or was written for other code.") from None


def _build_on_meta(architecture: dict[str, Any], specs: list[TensorSpec], where: str, root: Any) -> Model:
    def build() -> Model:
        with torch.device("meta"):
            model = build_module(architecture, context=root)
            if not isinstance(model, Model):
                raise ArtifactError(f"{where}: field 'architecture' is not a distsave Model.")
            materialize(model, specs)
        return model

    return _rebuilding(where, "architecture", build)


def _adopt_stored_dtypes(model: nn.Module, stored: dict[str, TensorEntry], source: str) -> None:
    """Compare the meta model with the file's headers; floating tensors take the stored dtype."""
    own = model.state_dict(keep_vars=True)
    problems = [f"missing {k}" for k in own if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in own]
    for key in own.keys() & stored.keys():
        mine, theirs = own[key], stored[key]
        if tuple(mine.shape) != theirs.shape:
            problems.append(f"{key}: file has {list(theirs.shape)}, architecture has {list(mine.shape)}")
        elif mine.dtype != theirs.dtype:
            if mine.is_floating_point() and theirs.dtype.is_floating_point:
                mine.data = torch.empty(theirs.shape, dtype=theirs.dtype, device="meta")
            else:
                problems.append(f"{key}: file has {theirs.dtype}, architecture has {mine.dtype}")
    if problems:
        raise ArtifactError(f"Weights in {source} do not fit the architecture: " + "; ".join(problems[:10])
                            + ". The artifact is damaged or was edited; re-save the model.")


def _allocate(model: nn.Module, device: torch.device,
              stored: dict[str, torch.Tensor] | None = None) -> None:
    """Give the meta model real memory: ``stored`` tensors (by state-dict name) where given,
    else uninitialised memory on ``device``; tied weights stay tied."""
    ties = _tied_parameters(model)
    persistent = set(model.state_dict())
    transient = [n for n, _ in model.named_buffers() if n not in persistent]
    if transient:
        raise ArtifactError(f"The architecture holds buffers that are not saved ({transient[:3]}); "
                            "their values cannot be restored without running its constructor for real.")
    # ``_apply`` hands over each parameter and buffer object, not its name: find it by identity.
    stored = stored or {}
    by_identity = {id(t): stored[name] for name, t in model.state_dict(keep_vars=True).items() if name in stored}
    model._apply(lambda t: by_identity[id(t)] if id(t) in by_identity else _empty_on(t, device))
    _tie(model, ties)


def _can_map(model: nn.Module, device: torch.device) -> bool:
    """Whether the tensors can live on a mapping of the files: a CPU load of whole tensors laid
    out as stored (contiguous)."""
    tensors = model.state_dict(keep_vars=True).values()
    return device.type == "cpu" and all(not is_dtensor(t) and t.is_contiguous() for t in tensors)


def _map_into_place(snapshot: Snapshot, model: Model, restore: bool) -> dict[str, torch.Tensor]:
    """Give the meta model the files' tensors, mapped (`Snapshot.map_tensors`); the optimizer's
    stored tensors, mapped too when ``restore``, after checking them against the parameters."""
    stored = _checked_optimizer_state(snapshot, model) if restore else None
    mapped = snapshot.map_tensors([WEIGHTS] if stored is None else [WEIGHTS, OPTIMIZER])
    _allocate(model, torch.device("cpu"), mapped[WEIGHTS])
    return mapped.get(OPTIMIZER, {})


def _empty_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``torch.empty_like(tensor, device=device)`` (what ``Module.to_empty`` does), by
    ``torch.empty`` where that is the same: ``empty_like`` of a ``meta`` tensor runs torch's
    Python reference, whose first call imports sympy (0.5-2 s of a load)."""
    if is_dtensor(tensor) or not tensor.is_contiguous():
        return torch.empty_like(tensor, device=device)
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)


def _read_into_place(snapshot: Snapshot, destinations: dict[str, dict[str, torch.Tensor]]) -> None:
    """Fill each tensor of ``destinations`` (``stem -> name -> tensor``) from the files of its
    stem, all files at once: a plain tensor whole, a sharded DTensor only the rows this process
    holds (the other processes read the rest)."""
    slices: dict[str, dict[str, tuple[torch.Tensor, int]]] = {}
    copy_back, shared = [], False
    for stem, tensors in destinations.items():
        slices[stem] = {}
        for name, tensor in tensors.items():
            local, first, replicated = local_slice(name, tensor)
            shared = shared or not replicated
            staged = local if local.is_contiguous() else torch.empty(local.shape, dtype=local.dtype, device=local.device)
            if staged is not local:
                copy_back.append((local, staged))
            slices[stem][name] = (staged, first)
    if shared:
        snapshot.read_tensor_slices(slices)
    else:
        snapshot.read_tensors({stem: {name: staged for name, (staged, _) in wanted.items()}
                               for stem, wanted in slices.items()})
    for local, staged in copy_back:
        local.copy_(staged)


def _optimizer_state_memory(snapshot: Snapshot, model: Model, device: torch.device) -> dict[str, torch.Tensor]:
    """Memory for the stored optimizer state tensors, each checked against its parameter first."""
    stored = _checked_optimizer_state(snapshot, model)
    if stored is None:
        return {}
    params = dict(model.named_parameters())
    return {key: _like_parameter(entry, params[key.rpartition("/")[0]], device) for key, entry in stored.items()}


def _checked_optimizer_state(snapshot: Snapshot, model: Model) -> dict[str, TensorEntry] | None:
    """The stored optimizer state tensors (None without an optimizer file), each named after a
    parameter of ``model`` and shaped like it (or a scalar)."""
    if not (snapshot.has(single_file(OPTIMIZER)) or snapshot.has(index_file(OPTIMIZER))):
        return None
    stored = snapshot.tensor_files(OPTIMIZER)
    params = dict(model.named_parameters())
    problems = []
    for key, entry in stored.items():
        name, _, field = key.rpartition("/")
        param = params.get(name)
        if param is None or not field:
            problems.append(f"{key}: names no parameter of the model")
        elif entry.shape != tuple(param.shape) and entry.shape not in ((), (1,)):
            problems.append(f"{key}: shape {list(entry.shape)}, parameter {name} has {list(param.shape)}")
    if problems:
        raise ArtifactError(f"Optimizer state in {snapshot.root / single_file(OPTIMIZER)} does not fit the "
                            "model: " + "; ".join(problems[:10]) + ". Re-save the model.")
    return stored


def _like_parameter(entry: TensorEntry, param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Memory for one stored optimizer tensor: sharded like its parameter when the parameter
    is a sharded DTensor of the same shape, else a plain tensor on ``device``."""
    if is_dtensor(param) and entry.shape == tuple(param.shape):
        from torch.distributed.tensor import DTensor

        local = param.to_local()
        return DTensor.from_local(torch.empty(local.shape, dtype=entry.dtype, device=local.device),
                                  param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return torch.empty(entry.shape, dtype=entry.dtype, device=device)
