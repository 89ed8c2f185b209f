"""Writing an artifact from a strategy's replicas, atomically; all agree on the outcome.

Every replica calls `write_artifact`. The chief makes a staging folder and swaps it into place
when the artifact is complete (for a URL: a local folder, then uploaded, manifest last). With
several replicas, every replica writes the bytes of the tensor files it holds straight into the
staging folder (`parallel_write`): a sharded model is never gathered, a replicated one is
written by all at once. Every replica returns once the artifact is complete, and every replica
raises if any failed or stopped, so no replica trains on believing a save happened.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..strategies import Strategy
from .atomic import atomic_directory
from .background import SaveHandle, start
from .errors import SaveError
from .format import MANIFEST
from .manifest import ArtifactWriter
from .parallel_write import HeldBytes, Plan, create_files, held_bytes, merge_records, plan_sets, write_held
from .storage import is_remote, local_path, remote_destination
from .tensor_io import alongside

TensorSets = dict[str, dict[str, torch.Tensor]]  # stem -> tensor name -> tensor

__all__ = ["is_artifact", "write_artifact", "write_artifact_in_background"]


def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` holds a distsave artifact (so a save may replace it)."""
    return (directory / MANIFEST).is_file()


@contextlib.contextmanager
def _local_target(path: str | os.PathLike) -> Iterator[Path]:
    """Where to write: the path itself, or a local folder uploaded afterwards for a URL."""
    if not is_remote(path):
        yield local_path(path)
        return
    try:
        with remote_destination(os.fspath(path)) as local:
            yield local
    except OSError as error:
        raise SaveError(f"Could not upload the artifact to '{path}': {error}. Nothing at that URL "
                        "claims to be complete (the manifest is uploaded last); save again.") from error


def write_artifact(strategy: Strategy, path: str | os.PathLike,
                   write: Callable[[ArtifactWriter], dict[str, Any]],
                   tensor_sets: TensorSets | None = None, max_shard_bytes: int | None = None) -> None:
    """Write an artifact to ``path`` atomically: the tensor files of ``tensor_sets`` (by every
    replica that holds their bytes when there are several) and, on the chief, meanwhile, in the
    calling thread, whatever ``write(writer)`` writes; it returns the manifest content.

    Raises:
        SaveError: on every replica, if any replica could not write or stopped (the previous
            artifact stays).
    """
    tensor_sets = tensor_sets or {}
    if strategy.num_replicas_in_sync > 1 and tensor_sets:
        held = {stem: {name: held_bytes(name, t) for name, t in tensors.items()} for stem, tensors in tensor_sets.items()}
        _write_together(strategy, path, write, held, plan_sets(held, max_shard_bytes))
        return
    failure: BaseException | None = None
    if strategy.is_chief:
        try:
            with _staging(path) as staging:
                writer = ArtifactWriter(staging)
                _, content = alongside(lambda: writer.write_tensor_sets(tensor_sets, max_shard_bytes),
                                       lambda: write(writer))
                writer.finish(content)
        except Exception as error:  # re-raised below, after the other replicas are told
            failure = error
    message = strategy.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise SaveError(f"Replica 0 failed to write '{path}': {message}")


@contextlib.contextmanager
def _staging(path: str | os.PathLike) -> Iterator[Path]:
    with _local_target(path) as target, atomic_directory(target, is_ours=is_artifact) as staging:
        yield staging


def _write_together(strategy: Strategy, path: str | os.PathLike, write: Callable[[ArtifactWriter], dict[str, Any]],
                    held: dict[str, dict[str, HeldBytes]], plan: Plan) -> None:
    """Every replica writes its bytes; the chief lists them and commits. Each step ends with
    every replica learning every other's outcome, so all fail together (naming who failed)."""
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync
    sharded = any(not part.replicated for tensors in held.values() for part in tensors.values())
    failure: BaseException | None = None
    finishing = False  # before: every failure is raised on every replica by `_exchange`
    try:
        with contextlib.ExitStack() as stack:
            staging = None
            if strategy.is_chief:
                try:
                    staging = stack.enter_context(_staging(path))
                    create_files(staging, plan)
                except Exception as error:  # told to every replica below
                    failure = error
            news = _exchange(strategy, path, {"staging": None if staging is None else str(staging),
                                              "fingerprint": plan.fingerprint()}, failure)
            staging = Path(news[0]["staging"])
            mismatched = [r for r, n in enumerate(news) if n["fingerprint"] != news[0]["fingerprint"]]
            if mismatched:
                raise SaveError(f"Cannot save '{path}': replica(s) {mismatched} hold other tensors (names, "
                                "dtypes or shapes) than replica 0. Every replica must save the same model.")
            shared = all(_exchange(strategy, path, staging.is_dir(), None))
            if not shared and sharded:
                raise SaveError(f"Cannot save a sharded model to '{path}': not every replica sees the "
                                "chief's staging folder there. Save to a file system all machines share.")
            report: dict[str, Any] = {}
            content: dict[str, Any] = {}
            writer = ArtifactWriter(staging) if strategy.is_chief else None
            if shared or strategy.is_chief:
                try:
                    report, content = alongside(
                        lambda: write_held(staging, plan, held, *((rank, world) if shared else (0, 1))),
                        lambda: write(writer) if writer is not None else {})
                    if shared:
                        _written_marker(staging, rank).touch()
                except Exception as error:  # told to every replica below
                    failure = error
            reports = _exchange(strategy, path, report, failure,
                                lambda: [r for r in range(world) if not _written_marker(staging, r).exists()])
            finishing = True
            if strategy.is_chief:
                for r in range(world):
                    _written_marker(staging, r).unlink(missing_ok=True)
                writer.files.update(merge_records(plan, reports))
                for stem, index in plan.indexes.items():
                    writer.write_index(stem, index)
                writer.finish(content)
    except Exception as error:  # the chief's listing or commit failed: told to every replica below
        if not finishing:
            raise
        failure = error
    _exchange(strategy, path, None, failure)


def _written_marker(staging: Path, rank: int) -> Path:
    """The empty file a replica leaves in the staging folder once its bytes are on disk, so the
    others can name a replica that stopped before it finished."""
    return staging / f".written-by-replica-{rank}"


def _exchange(strategy: Strategy, path: str | os.PathLike, value: Any, failure: BaseException | None,
              stopped: Callable[[], list[int]] | None = None) -> list[Any]:
    """Every replica's ``value``; raises `SaveError` on all if any replica reports a failure or
    stops responding (naming it, when ``stopped`` can tell)."""
    mine = {"error": f"{type(failure).__name__}: {failure}"} if failure is not None else {"value": value}
    try:
        everyone = strategy.all_gather_object(mine)
    except RuntimeError as error:  # a replica died: the collective breaks or times out
        who = f"replica(s) {stopped()}" if stopped is not None else "a replica"
        raise SaveError(f"The save to '{path}' stopped: {who} stopped responding before finishing its "
                        f"part ({error}). The previous artifact is intact; see that replica's log "
                        "for why it stopped.") from error
    failed = [f"replica {r}: {entry['error']}" for r, entry in enumerate(everyone) if "error" in entry]
    if failed:
        raise SaveError(f"Could not save '{path}': " + "; ".join(failed) + ". The previous artifact is "
                        "intact.") from failure
    return [entry["value"] for entry in everyone]


def write_artifact_in_background(strategy: Strategy, path: str | os.PathLike,
                                 write: Callable[[ArtifactWriter], dict[str, Any]],
                                 tensor_sets: TensorSets | None = None,
                                 max_shard_bytes: int | None = None,
                                 ready: Callable[[], None] | None = None) -> SaveHandle:
    """As `write_artifact`, but the chief writes everything in a background thread (from copies
    the caller made; ``ready()`` waits until they are complete) and every replica returns at
    once. Replicas are not told of the outcome (that would need a collective while training
    runs); the chief's next save or `wait_for_saves` raises a failure."""
    if not strategy.is_chief:
        return SaveHandle(os.fspath(path))

    def write_all() -> None:
        if ready is not None:
            ready()
        with _staging(path) as staging:
            writer = ArtifactWriter(staging)
            writer.write_tensor_sets(tensor_sets or {}, max_shard_bytes)
            writer.finish(write(writer))

    return start(os.fspath(path), write_all)
