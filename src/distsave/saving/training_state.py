"""The training-state artifact: where a fit stopped, written beside a model checkpoint.

Its manifest's ``resume_state`` holds the JSON half of a `TrainingState` (positions, the
Python and NumPy RNGs, the data order); ``training_state.safetensors`` holds the tensors
(torch RNG states as uint8, metric sums as float64). Nothing in it is executed or unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..strategies import Strategy
from ..training.resume_state import TrainingState
from .background import SaveHandle
from .commit import write_artifact, write_artifact_in_background
from .errors import ArtifactError
from .format import KIND_TRAINING_STATE, MANIFEST, TRAINING_STATE
from .manifest import ArtifactWriter
from .snapshot import Snapshot

__all__ = ["read_training_state", "write_training_state"]


def write_training_state(strategy: Strategy, path: str | os.PathLike, state: TrainingState, *,
                         blocking: bool = True) -> SaveHandle:
    """Write ``state`` as an artifact at ``path`` (call on every replica; the chief writes)."""
    def write(writer: ArtifactWriter) -> dict[str, Any]:
        writer.write_tensors(TRAINING_STATE, state.tensors)
        return {"kind": KIND_TRAINING_STATE, "resume_state": state.resume}

    if not blocking:
        return write_artifact_in_background(strategy, path, write)
    write_artifact(strategy, path, write)
    return SaveHandle(os.fspath(path))


def read_training_state(path: str | os.PathLike) -> TrainingState:
    """Read and check a training-state artifact (schema, checksums, tensors per replica).

    Raises:
        ArtifactError: not a training-state artifact, damaged, or inconsistent.
    """
    with Snapshot.open(Path(path)) as snapshot:
        manifest = snapshot.manifest
        where = str(snapshot.root / MANIFEST)
        if manifest["kind"] != KIND_TRAINING_STATE:
            raise ArtifactError(f"{where}: expected a {KIND_TRAINING_STATE!r} artifact (written by a "
                                f"CheckpointManager with a training state). Received: {manifest['kind']!r}.")
        tensors = snapshot.allocate_and_read(TRAINING_STATE)
        snapshot.verify_remaining()
    resume = manifest["resume_state"]
    expected = {f"replica_{r}.{name}" for r in range(resume["num_replicas"])
                for name in ("torch_rng", "metric_sums")}
    missing = sorted(expected - set(tensors))
    sums_shape = (len(resume["metric_names"]), 2)
    bad = [k for k, t in tensors.items() if k.endswith(".metric_sums") and tuple(t.shape) != sums_shape]
    if missing or bad:
        raise ArtifactError(f"{snapshot.root}: the training state lacks {missing[:4]} or has metric sums "
                            f"of the wrong shape {bad[:4]} (expected {list(sums_shape)}). Its writer "
                            "was not distsave, or the artifact was edited.")
    return TrainingState(resume, tensors)
