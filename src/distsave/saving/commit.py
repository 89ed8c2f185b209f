"""Writing an artifact from a strategy's replicas: the chief writes, atomically; all agree.

Every replica calls `write_artifact`; the chief writes into a staging folder and swaps it into
place; every replica returns once the artifact is complete, and every replica raises if the
chief failed, so no replica trains on believing a save happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..strategies import Strategy
from .atomic import atomic_directory
from .errors import SaveError
from .format import MANIFEST
from .manifest import ArtifactWriter

__all__ = ["is_artifact", "write_artifact"]


def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` holds a distsave artifact (so a save may replace it)."""
    return (directory / MANIFEST).is_file()


def _check_local(path: str | os.PathLike) -> None:
    text = os.fspath(path)
    if "://" in text:
        raise SaveError(f"Expected a local directory path. Received: '{text}', a URL. Save to a "
                        "local folder and upload it with your storage tool.")


def write_artifact(strategy: Strategy, path: str | os.PathLike,
                   write: Callable[[ArtifactWriter], dict[str, Any]]) -> None:
    """Run ``write(writer)`` on the chief, which returns the manifest content; the writer's
    files and manifest are then swapped into ``path`` atomically.

    Raises:
        SaveError: on every replica, if the chief could not write (the previous artifact stays).
    """
    _check_local(path)
    failure: BaseException | None = None
    if strategy.is_chief:
        try:
            with atomic_directory(path, is_ours=is_artifact) as staging:
                writer = ArtifactWriter(staging)
                writer.finish(write(writer))
        except Exception as error:  # re-raised below, after the other replicas are told
            failure = error
    message = strategy.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise SaveError(f"Replica 0 failed to write '{path}': {message}")
