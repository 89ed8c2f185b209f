"""`CheckpointManager`: numbered checkpoints in one folder, an atomic index, retention policies.

Layout of ``directory``::

    checkpoints.json     the index: which checkpoints are complete (written atomically, last)
    ckpt-120/            a model artifact (`model.save`), loadable on its own
    ckpt-120.state/      its training-state artifact, when a fit's resume point was given
    .checkpoints.lock    taken by a saver for the whole of one save

A checkpoint exists once the index lists it, and the index is replaced by one ``rename`` after
both artifacts are durable, so a saver killed at any point leaves ``latest`` at the previous
complete checkpoint. Retention runs after that and removes a checkpoint by renaming it to a
hidden name first, so a half-deleted one is never seen under its own name. Savers in several
processes take the lock file in turn (one whole save at a time), so the index is never
rewritten from a stale read and a saver never removes another's work; the last save of a step
wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.model import Model
from ..training.resume_state import TrainingState
from . import background
from .errors import ArtifactError, SaveError
from .format import MAX_INDEX_BYTES
from .model_format import load_model
from .snapshot import parse_json
from .training_state import read_training_state, write_training_state

__all__ = ["Checkpoint", "CheckpointManager"]

logger = logging.getLogger(__name__)

INDEX = "checkpoints.json"
INDEX_FORMAT = "distsave-checkpoints"
INDEX_VERSION = 1
_LOCK = ".checkpoints.lock"
_STATE_SUFFIX = ".state"
_REMOVING = ".removing-"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
_RESTORE_ATTEMPTS = 3


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint listed in the index.

    Attributes:
        step: Its step number.
        path: The model artifact (``distsave.load_model(path)`` loads it).
        training_state: The training-state artifact, or None.
        metrics: The values it was saved with (``save(metrics=...)``).
        time: When it was committed (seconds since the epoch).
    """

    step: int
    path: Path
    training_state: Path | None
    metrics: dict[str, float | None]
    time: float


class CheckpointManager:
    """Save, list, retain and restore numbered checkpoints of a model in one folder.

    Args:
        directory: The folder (created on the first save).
        max_to_keep: How many checkpoints retention keeps (the newest, or the best with
            ``monitor``/``best_fn``); None keeps all. The newest is always kept.
        keep_checkpoint_every_n_steps: Also keep, for good, every checkpoint whose step is a
            multiple of this.
        monitor: Rank checkpoints by this metric (given to `save` as ``metrics``) instead of age.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for names containing "acc", else min).
        best_fn: Rank by ``best_fn(metrics) -> float`` instead of one metric (with ``mode``).
        checkpoint_name: Prefix of the checkpoint folders (``ckpt-120``).

    Raises:
        ValueError: a setting out of range (the message names it).

    Example:
        >>> manager = CheckpointManager("run/checkpoints", max_to_keep=3)
        >>> manager.save(model, metrics={"val_loss": 0.31})
        >>> model = manager.restore()                       # the latest, as a new model
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 5,
                 keep_checkpoint_every_n_steps: int | None = None, *, monitor: str | None = None,
                 mode: str = "auto", best_fn: Callable[[dict[str, float]], float] | None = None,
                 checkpoint_name: str = "ckpt"):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"Expected max_to_keep >= 1 or None. Received: max_to_keep={max_to_keep!r}.")
        if keep_checkpoint_every_n_steps is not None and not (
                isinstance(keep_checkpoint_every_n_steps, int) and keep_checkpoint_every_n_steps >= 1):
            raise ValueError("Expected keep_checkpoint_every_n_steps >= 1 or None. Received: "
                             f"{keep_checkpoint_every_n_steps!r}.")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Expected mode 'auto', 'min' or 'max'. Received: mode={mode!r}.")
        if monitor is not None and best_fn is not None:
            raise ValueError("Pass monitor= or best_fn=, not both.")
        if not isinstance(checkpoint_name, str) or not _NAME.match(checkpoint_name):
            raise ValueError("Expected checkpoint_name of letters, digits, '_' or '-'. Received: "
                             f"{checkpoint_name!r}.")
        self.directory = Path(directory)
        self.max_to_keep, self.every_n = max_to_keep, keep_checkpoint_every_n_steps
        self.monitor, self.best_fn, self.name = monitor, best_fn, checkpoint_name
        self.mode = mode if mode != "auto" else ("max" if monitor and "acc" in monitor else "min")

    # -- listing --------------------------------------------------------------------------
    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest step first."""
        return [self._checkpoint(e) for e in self._read_index()]

    @property
    def latest(self) -> Checkpoint | None:
        """The checkpoint with the highest step, or None."""
        entries = self._read_index()
        return self._checkpoint(entries[-1]) if entries else None

    def _folder(self, step: int) -> Path:
        return self.directory / f"{self.name}-{step}"

    def _checkpoint(self, entry: dict[str, Any]) -> Checkpoint:
        folder = self._folder(entry["step"])
        state = folder.with_name(folder.name + _STATE_SUFFIX) if entry["training_state"] else None
        return Checkpoint(entry["step"], folder, state, entry["metrics"], entry["time"])

    # -- saving ---------------------------------------------------------------------------
    def save(self, model: Model, step: int | None = None, *, metrics: dict[str, Any] | None = None,
             training_state: TrainingState | None = None, blocking: bool = True) -> Checkpoint:
        """Write a checkpoint of ``model`` (and a fit's resume point), then apply retention.

        Call on every replica, as `model.save`: the chief writes. With ``blocking=False`` the
        chief writes in the background after the tensors are copied to host memory;
        `distsave.wait_for_saves` waits for it (index and retention included).

        Args:
            model: The model; its weights, optimizer state, ``epoch`` and ``step`` are saved.
            step: The checkpoint's number (default ``model.step``); saving a step again
                replaces it.
            metrics: Numbers recorded in the index (what ``monitor``/``best_fn`` rank by).
            training_state: A resume point (see `BackupAndRestore`), stored beside the model.

        Returns:
            The `Checkpoint` (listed in the index once the save is complete).

        Raises:
            SaveError: the write failed on the chief (raised on every replica for a blocking
                save); the index still lists only complete checkpoints.
        """
        step = model.step if step is None else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Expected a step >= 0. Received: step={step!r}.")
        entry = {"step": step, "training_state": training_state is not None,
                 "metrics": {k: _number(k, v) for k, v in (metrics or {}).items()}, "time": 0.0}
        strategy = model.distribute_strategy
        folder = self._folder(step)
        lock = self._lock() if strategy.is_chief else None
        try:
            handles = [model.save(folder, blocking=blocking)]
            if training_state is not None:
                handles.append(write_training_state(strategy, folder.with_name(folder.name + _STATE_SUFFIX),
                                                    training_state, blocking=blocking))
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        if not blocking:
            if lock is not None:
                background.start(str(folder), lambda: self._commit_and_release(lock, entry, handles))
            return self._checkpoint(entry)
        failure: Exception | None = None
        if lock is not None:
            try:
                self._commit_and_release(lock, entry, handles)
            except Exception as error:  # re-raised below, after the other replicas are told
                failure = error
        message = strategy.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise SaveError(f"Checkpoint {step} was written but could not be listed in "
                            f"'{self.directory / INDEX}': {failure}. The index still lists the "
                            "previous checkpoints; save again.") from failure
        if message is not None:
            raise SaveError(f"Replica 0 failed to list checkpoint {step} in '{self.directory / INDEX}': {message}")
        return self._checkpoint(entry)

    def _commit_and_release(self, lock: Any, entry: dict[str, Any], handles: list[Any]) -> None:
        """Once every artifact of ``entry`` is durable: list it, then apply retention."""
        try:
            for handle in handles:
                handle.result()
            entry["time"] = time.time()
            entries = [e for e in self._read_index() if e["step"] != entry["step"]] + [entry]
            entries.sort(key=lambda e: e["step"])
            kept = self._retained(entries)
            self._write_index(kept)
            self._remove_unlisted({e["step"] for e in kept})
        finally:
            lock.close()

    def _lock(self) -> Any:
        """The lock file, held (exclusively) until closed."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = open(self.directory / _LOCK, "a+b")  # closed by the caller, which releases it
        except OSError as error:
            raise SaveError(f"Could not create the checkpoint folder '{self.directory}': {error}. "
                            "Choose a folder you can write to.") from error
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        return file

    # -- retention ------------------------------------------------------------------------
    def _score(self, entry: dict[str, Any]) -> float | None:
        if self.best_fn is not None:
            return float(self.best_fn(entry["metrics"]))
        value = entry["metrics"].get(self.monitor) if self.monitor else None
        return None if value is None else float(value)

    def _retained(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The entries to keep: the ``max_to_keep`` newest (or best), every n-th, and the newest."""
        if self.max_to_keep is None:
            return entries
        preserved = [e for e in entries if self.every_n and e["step"] % self.every_n == 0]
        candidates = [e for e in entries if e not in preserved]
        if self.monitor is None and self.best_fn is None:
            ranked = sorted(candidates, key=lambda e: -e["step"])
        else:
            sign = -1 if self.mode == "max" else 1

            def rank(e: dict[str, Any]) -> tuple:
                score = self._score(e)
                return (score is None, 0.0 if score is None else sign * score, -e["step"])
            ranked = sorted(candidates, key=rank)
        keep = {id(e) for e in ranked[: self.max_to_keep]} | {id(e) for e in preserved} | {id(entries[-1])}
        return [e for e in entries if id(e) in keep]

    def _remove_unlisted(self, listed: set[int]) -> None:
        """Remove checkpoint folders the index does not list (dropped, or left by a dead saver;
        under the lock no live saver has one in progress), and earlier half-done removals."""
        pattern = re.compile(rf"^{re.escape(self.name)}-(\d+)({re.escape(_STATE_SUFFIX)})?$")
        for entry in os.scandir(self.directory):
            match = pattern.match(entry.name)
            if match and int(match.group(1)) not in listed:
                hidden = self.directory / f".{entry.name}{_REMOVING}{os.getpid()}-{time.monotonic_ns()}"
                os.rename(entry.path, hidden)  # out of sight first: never half-deleted under its name
                shutil.rmtree(hidden, ignore_errors=True)
            elif entry.name.startswith(".") and (_REMOVING in entry.name or entry.name.startswith(f".{INDEX}.tmp-")):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)

    def clear(self) -> None:
        """Remove every checkpoint and the index (call on the chief only)."""
        lock = self._lock()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / INDEX)
            self._remove_unlisted(set())
        finally:
            lock.close()

    # -- the index ------------------------------------------------------------------------
    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        content = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "checkpoint_name": self.name,
                   "checkpoints": entries}
        _replace_file(self.directory / INDEX, json.dumps(content, indent=1).encode())

    def _read_index(self) -> list[dict[str, Any]]:
        path = self.directory / INDEX
        where = str(path)
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            return []
        if len(data) > MAX_INDEX_BYTES:
            raise ArtifactError(f"{where} is over {MAX_INDEX_BYTES} bytes; refusing it.")
        index = parse_json(data, where)

        def fail(field: str, expected: str) -> ArtifactError:
            return ArtifactError(f"{where}: field '{field}' should be {expected}. The index is damaged "
                                 "or was not written by distsave; remove it to start afresh.")
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise fail("format", repr(INDEX_FORMAT))
        if index.get("version") != INDEX_VERSION:
            raise fail("version", str(INDEX_VERSION))
        if index.get("checkpoint_name") != self.name:
            raise ArtifactError(f"{where} indexes checkpoints named {index.get('checkpoint_name')!r}; this "
                                f"manager uses {self.name!r}. Pass checkpoint_name= to match, or "
                                "another directory.")
        entries = index.get("checkpoints")
        if not isinstance(entries, list):
            raise fail("checkpoints", "a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise fail(f"checkpoints[{i}]", "an object")
            step = entry.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise fail(f"checkpoints[{i}].step", "a non-negative integer")
            if not isinstance(entry.get("training_state"), bool):
                raise fail(f"checkpoints[{i}].training_state", "true or false")
            metrics = entry.get("metrics")
            if not isinstance(metrics, dict) or not all(
                    isinstance(v, (int, float, type(None))) and not isinstance(v, bool) for v in metrics.values()):
                raise fail(f"checkpoints[{i}].metrics", "an object of numbers")
            if not isinstance(entry.get("time"), (int, float)):
                raise fail(f"checkpoints[{i}].time", "a number")
        if [e["step"] for e in entries] != sorted({e["step"] for e in entries}):
            raise fail("checkpoints", "entries in increasing step order, each step once")
        return entries

    # -- restoring ------------------------------------------------------------------------
    def _find(self, step: int | None) -> Checkpoint:
        entries = self._read_index()
        if not entries:
            raise ArtifactError(f"No checkpoint in '{self.directory}' (no {INDEX}, or it lists none). "
                                "Save one first, or pass the directory the run wrote.")
        if step is None:
            return self._checkpoint(entries[-1])
        for entry in entries:
            if entry["step"] == step:
                return self._checkpoint(entry)
        raise ArtifactError(f"No checkpoint of step {step} in '{self.directory}'. Available steps: "
                            f"{[e['step'] for e in entries]}.")

    def restore(self, model: Model | None = None, step: int | None = None) -> Model:
        """Load a checkpoint (the latest by default).

        Args:
            model: Load into this model (weights, optimizer state, ``epoch``, ``step``), which
                must have the checkpoint's architecture; None returns a new model, as
                `distsave.load_model`.
            step: Which checkpoint; None for the latest.

        Raises:
            ArtifactError: no such checkpoint, or it fails validation.
        """
        for attempt in range(_RESTORE_ATTEMPTS):
            checkpoint = self._find(step)
            try:
                return _load(checkpoint.path, model)
            except ArtifactError:
                # Retention in another process may have removed it since the index was read.
                if attempt == _RESTORE_ATTEMPTS - 1 or self._find(step) == checkpoint:
                    raise
        raise AssertionError("unreachable")

    def restore_training_state(self, step: int | None = None) -> TrainingState | None:
        """The resume point saved with a checkpoint (the latest by default), or None."""
        checkpoint = self._find(step)
        return None if checkpoint.training_state is None else read_training_state(checkpoint.training_state)


def _load(path: Path, model: Model | None) -> Model:
    if model is None:
        return load_model(path)
    with model.distribute_strategy.scope():
        loaded = load_model(path, compile=model.compiled)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ArtifactError(f"The checkpoint '{path}' does not fit this model: {error}. Restore into a "
                            "model built as the one that was saved, or restore without model=.") from None
    if model.compiled and loaded.optimizer is not None:
        model.optimizer.load_state_dict(loaded.optimizer.state_dict())
    model.epoch, model.step = loaded.epoch, loaded.step
    return model


def _number(name: str, value: Any) -> float | None:
    """A metric value as a float for the index (tensors read once)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected numbers in metrics=. Received: {name}={value!r}.") from None


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a fsync'd sibling renamed over it, then the folder
    fsync'd (so the rename survives a power cut)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

