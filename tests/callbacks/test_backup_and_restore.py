"""A fit killed (SIGKILL, SIGTERM) at any point resumes to the bitwise weights of an unbroken run.

Real processes, gloo on CPU. Each chain kills the run at several points in turn (between
steps, while a backup's tensors are written, after an artifact is renamed into place, after
the index is replaced, and by SIGTERM), restarting the same program each time until it
completes. DISTSAVE_RESUME_KILLS=10 runs ten kills per chain (the acceptance run).
"""

import json
import os
import random
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import run_script

from distsave.saving.checkpoint_manager import INDEX
from distsave.saving.manifest import read_manifest

POINTS = ["step", "weights", "state", "swap", "index", "sigterm"]
STEPS = 18  # 3 epochs of 6 batches; a backup every 2 steps


def _train(out: Path, strategy: str, kill: str | None = None):
    return run_script("train_with_backup.py", str(out), strategy, *([kill] if kill else []),
                      timeout=300, check=kill is None)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {**load_file(out / "final" / "model.safetensors"), **load_file(out / "final" / "optimizer.safetensors")}


def _check_backups(backup: Path) -> int:
    """Every artifact in the backup folder verifies; returns the step the index lists (0: none)."""
    if not (backup / INDEX).exists():  # killed before the first backup was listed
        return 0
    index = json.loads((backup / INDEX).read_text())
    (entry,) = index["checkpoints"]
    for folder in backup.iterdir():
        if not folder.name.startswith("."):
            assert folder.name == INDEX or read_manifest(folder)  # checksums of every file
    assert (backup / f"backup-{entry['step']}").is_dir() and (backup / f"backup-{entry['step']}.state").is_dir()
    return entry["step"]


def _kills(seed: int, count: int) -> list[str]:
    """``count`` kill points at increasing steps, each kind of point used in turn."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, STEPS), count))
    kinds = [POINTS[i % len(POINTS)] for i in range(count)]
    rng.shuffle(kinds)
    return [f"{kind}:{step + (step % 2 if kind in ('weights', 'state', 'swap', 'index') else 0)}"
            for kind, step in zip(kinds, steps)]


def _kill_and_resume(tmp_path: Path, strategy: str, kills: list[str]) -> None:
    reference = tmp_path / "reference"
    _train(reference, strategy)
    out = tmp_path / "interrupted"
    listed = 0
    for kill in kills:
        where, _, at = kill.partition(":")
        result = _train(out, strategy, kill)
        if where == "sigterm":  # 143 (128 + SIGTERM); the launcher of replicas reports 1
            assert result.returncode == (143 if strategy == "one" else 1), result.stderr[-3000:]
            assert f"fit stopped on SIGTERM after step {at}" in result.stderr
            assert "fit stopped on SIGTERM after step" in result.stderr
            assert "run the same program again to resume" in result.stderr
        else:
            assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        step = _check_backups(out / "backup")
        # A save killed before its index was replaced is never the latest.
        expected = int(at) if where in ("index", "sigterm") else int(at) - int(at) % 2
        if where in ("weights", "state", "swap"):
            expected = int(at) - 2
        assert step == max(expected, listed), (kill, step)
        listed = step
    _train(out, strategy)
    assert (out / "done").exists()
    ours, theirs = _weights(out), _weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed weights differ from the unbroken run"


def test_one_device_fit_killed_anywhere_resumes_bitwise(tmp_path):
    count = int(os.environ.get("DISTSAVE_RESUME_KILLS", 0))
    kills = _kills(seed=12, count=count) if count else ["step:3", "weights:6", "swap:10", "index:12", "sigterm:15"]
    _kill_and_resume(tmp_path, "one", kills)


def test_two_replica_fit_killed_and_preempted_resumes_bitwise(tmp_path):
    count = int(os.environ.get("DISTSAVE_RESUME_KILLS", 0))
    kills = _kills(seed=34, count=count) if count else ["state:8", "sigterm:11"]
    _kill_and_resume(tmp_path, "mirrored", kills)
