"""Writing an artifact from a strategy's replicas: the chief writes, atomically; all agree.

Every replica calls `write_artifact`; the chief writes into a staging folder and swaps it into
place (for a URL, into a local folder that is then uploaded, manifest last); every replica returns once the artifact is complete, and every replica raises if the
chief failed, so no replica trains on believing a save happened.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..strategies import Strategy
from .atomic import atomic_directory
from .background import SaveHandle, start
from .errors import SaveError
from .format import MANIFEST
from .manifest import ArtifactWriter
from .storage import is_remote, local_path, remote_destination

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
                   write: Callable[[ArtifactWriter], dict[str, Any]]) -> None:
    """Run ``write(writer)`` on the chief, which returns the manifest content; the writer's
    files and manifest are then swapped into ``path`` atomically.

    Raises:
        SaveError: on every replica, if the chief could not write (the previous artifact stays).
    """
    failure: BaseException | None = None
    if strategy.is_chief:
        try:
            _write(path, write)
        except Exception as error:  # re-raised below, after the other replicas are told
            failure = error
    message = strategy.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise SaveError(f"Replica 0 failed to write '{path}': {message}")


def _write(path: str | os.PathLike, write: Callable[[ArtifactWriter], dict[str, Any]]) -> None:
    with _local_target(path) as target, atomic_directory(target, is_ours=is_artifact) as staging:
        writer = ArtifactWriter(staging)
        writer.finish(write(writer))


def write_artifact_in_background(strategy: Strategy, path: str | os.PathLike,
                                 write: Callable[[ArtifactWriter], dict[str, Any]]) -> SaveHandle:
    """As `write_artifact`, but the chief writes in a background thread and every replica
    returns at once. Replicas are not told of the outcome (that would need a collective while
    training runs); the chief's next save or `wait_for_saves` raises a failure."""
    if not strategy.is_chief:
        return SaveHandle(os.fspath(path))
    return start(os.fspath(path), lambda: _write(path, write))
