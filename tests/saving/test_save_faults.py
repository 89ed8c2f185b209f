"""Real faults during model.save: concurrent savers, symbolic links, full and read-only disks,
folders you may not write to. Every failure is a SaveError naming the path and the fix, and
the artifact already there is never damaged.

Disk-full and read-only cases use real tmpfs mounts, so they run as root where ``mount`` works
and are skipped otherwise; the permission case uses chmod (as user nobody when run as root).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, SCRIPTS

import distsave
from distsave.saving import atomic
from distsave.saving.commit import is_artifact
from distsave.saving.manifest import read_manifest

NOBODY = 65534


def model_of(weight: float, width: int = 4) -> distsave.Sequential:
    """A one-layer model whose every weight is ``weight``: which save won is visible on load."""
    model = distsave.Sequential([nn.Linear(width, 2)], input_spec=distsave.TensorSpec((None, width)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(weight)
    return model


def saved_weight(artifact: Path) -> float:
    """Verify every checksum, load, and return the (uniform) weight of the saved model."""
    read_manifest(artifact)
    values = torch.cat([v.flatten() for v in distsave.saved_model.load(artifact).variables.values()])
    assert torch.all(values == values[0]), "the artifact mixes two models' weights"
    return values[0].item()


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Saver:
    """A real process running tests/scripts/concurrent_save.py, driven through its stdin."""

    def __init__(self, tmp_path: Path, *args: str):
        self.stderr = tempfile.TemporaryFile(mode="w+", dir=tmp_path)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        self.process = subprocess.Popen([sys.executable, str(SCRIPTS / "concurrent_save.py"), *args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"})

    def expect(self, line: str) -> None:
        got = self.process.stdout.readline().strip()
        assert got == line, f"expected {line!r} from the saver, got {got!r}{self._stderr()}"

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def errors(self) -> list[str]:
        """Wait for the saver to finish; the failures it reported, as "Type: message"."""
        out, _ = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, f"saver exited {self.process.returncode}{self._stderr()}"
        return json.loads(out.strip().splitlines()[-1])["errors"]

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return "\nstderr:\n" + self.stderr.read()[-3000:]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.stderr.close()


@pytest.fixture
def savers(tmp_path):
    started: list[Saver] = []

    def start(*args: str) -> Saver:
        started.append(Saver(tmp_path, *args))
        return started[-1]

    yield start
    for saver in started:
        saver.kill()


# --- concurrent savers ---------------------------------------------------------------------


def test_two_processes_saving_one_path_20_times_all_succeed_and_the_last_swap_wins(tmp_path, savers):
    target = tmp_path / "model"
    first, second = savers("loop", str(target), "100", "20"), savers("loop", str(target), "200", "20")
    first.expect("ready")
    second.expect("ready")
    first.go()
    second.go()

    assert first.errors() == [] and second.errors() == []
    assert saved_weight(target) in (119.0, 219.0)  # one of the two processes' last models
    assert entries(tmp_path) == ["model"]


@pytest.mark.parametrize("lock", ["held", "removed"])
def test_a_save_never_removes_the_staging_folder_of_a_save_in_flight(tmp_path, savers, monkeypatch, lock):
    target = tmp_path / "model"
    model_of(1.0).save(target)
    held = savers("hold", str(target), "2")
    held.expect("staging")  # the other process's artifact is written, not yet swapped in
    if lock == "removed":  # the guard off: the clean-up takes every staging folder for a leftover
        monkeypatch.setattr(atomic, "_lock", lambda fd: True)

    model_of(3.0).save(target)
    assert saved_weight(target) == 3.0
    held.go()

    if lock == "held":
        assert held.errors() == []
        assert saved_weight(target) == 2.0  # the last swap wins
        assert entries(tmp_path) == ["model"]
    else:  # shows the test above fails without the lock
        assert [error.split(":")[0] for error in held.errors()] == ["SaveError"]


@pytest.mark.parametrize("lock", ["held", "removed"])
def test_two_rename_swaps_take_turns_where_the_file_system_cannot_exchange(tmp_path, savers, monkeypatch,
                                                                            lock):
    """Without renameat2's exchange (other systems) a swap is two renames; they hold a lock on
    the parent folder, so a second saver never finds the target name empty mid-swap."""
    target = tmp_path / "model"
    model_of(1.0).save(target)
    held = savers("hold-swap", str(target), "2")
    held.expect("swapping")  # the other process moved the old artifact aside, holding the lock
    real_flock = fcntl.flock
    waited = []

    def flock_releasing_the_other_saver_when_it_must_wait(fd, operation):
        if operation == fcntl.LOCK_EX:
            try:
                return real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited.append(fd)
                held.go()
        return real_flock(fd, operation)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic.fcntl, "flock", flock_releasing_the_other_saver_when_it_must_wait)
    if lock == "held":
        model_of(3.0).save(target)
        assert waited, "this save swapped while the other was between its renames"
        assert held.errors() == []
        assert saved_weight(target) == 3.0  # this save swapped last
        assert entries(tmp_path) == ["model"]
    else:  # shows the test above fails without the lock: this save moves into the empty name
        monkeypatch.setattr(atomic, "_folder_lock", lambda folder: contextlib.nullcontext())
        model_of(3.0).save(target)
        held.go()
        assert [error.split(":")[0] for error in held.errors()] == ["SaveError"]


@pytest.mark.parametrize("check", ["on", "off"])
def test_a_staging_folder_swept_before_its_saver_locks_it_is_replaced_by_a_fresh_one(tmp_path, monkeypatch,
                                                                                      check):
    """Between creating its staging folder and locking it, a saver can lose the folder to another
    saver's clean-up; it notices (the name no longer holds what it locked) and starts afresh."""
    target = tmp_path / "model"
    model_of(1.0).save(target)
    real_open, swept = atomic._open_directory, []

    def open_then_lose_it_to_another_savers_sweep(path):
        fd = real_open(path)
        if not swept:
            swept.append(path)
            atomic._remove_stale_temporaries(target)
        return fd

    monkeypatch.setattr(atomic, "_open_directory", open_then_lose_it_to_another_savers_sweep)
    if check == "on":
        model_of(2.0).save(target)
        assert not swept[0].exists()
        assert saved_weight(target) == 2.0
        assert entries(tmp_path) == ["model"]
    else:  # shows the test above fails without the check: the save writes into a removed folder
        monkeypatch.setattr(atomic, "_still_at", lambda path, fd: True)
        with pytest.raises(Exception, match="No such file or directory"):  # any writer's error
            model_of(2.0).save(target)
        assert saved_weight(target) == 1.0


class Crash(BaseException):
    """Stands for a SIGKILL: nothing in the saver handles it."""


def test_an_artifact_moved_aside_by_a_saver_that_died_mid_swap_is_put_back(tmp_path, monkeypatch):
    """Where the swap is two renames, a saver killed between them leaves the old artifact aside;
    the next save restores it first, so even a failing next save leaves it in place."""
    target = tmp_path / "model"
    model_of(1.0).save(target)
    real_rename = os.rename

    def rename_then_die_with_the_target_aside(source, destination):
        real_rename(source, destination)
        if Path(source) == target:
            raise Crash

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(atomic.os, "rename", rename_then_die_with_the_target_aside)
        model_of(2.0).save(target)
    assert not target.exists()

    with pytest.raises(distsave.SaveError, match="disk is full"):
        with atomic.atomic_directory(target, is_ours=is_artifact):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert saved_weight(target) == 1.0
    assert entries(tmp_path) == ["model"]


# --- symbolic links ------------------------------------------------------------------------


def test_saving_through_a_symlink_replaces_the_artifact_it_points_to_and_keeps_the_link(tmp_path):
    model_of(1.0).save(tmp_path / "run-42")
    (tmp_path / "latest").symlink_to("run-42")

    model_of(2.0).save(tmp_path / "latest")

    assert os.readlink(tmp_path / "latest") == "run-42"
    assert saved_weight(tmp_path / "run-42") == 2.0
    assert entries(tmp_path) == ["latest", "run-42"]


def test_saving_through_a_dangling_symlink_creates_the_folder_it_names(tmp_path):
    (tmp_path / "latest").symlink_to("run-43")

    model_of(2.0).save(tmp_path / "latest")

    assert os.readlink(tmp_path / "latest") == "run-43"
    assert saved_weight(tmp_path / "run-43") == 2.0
    assert entries(tmp_path) == ["latest", "run-43"]


def test_saving_through_a_symlink_loop_is_a_save_error(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")

    with pytest.raises(distsave.SaveError, match="symbolic link loop"):
        model_of(2.0).save(tmp_path / "a")
    assert entries(tmp_path) == ["a", "b"]


# --- paths that cannot hold an artifact ----------------------------------------------------


@pytest.mark.parametrize("below", ["model", "sub/model"])
def test_a_parent_that_is_a_file_is_a_save_error_naming_it(tmp_path, below):
    (tmp_path / "notes.txt").write_text("not a folder")

    with pytest.raises(distsave.SaveError, match=r"parents .* to be folders.*notes\.txt', which is a file"):
        model_of(1.0).save(tmp_path / "notes.txt" / below)
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


def test_a_target_that_is_a_file_is_a_save_error(tmp_path):
    (tmp_path / "model").write_text("not a folder")

    with pytest.raises(distsave.SaveError, match="is an existing file"):
        model_of(1.0).save(tmp_path / "model")
    assert entries(tmp_path) == ["model"]


def test_a_folder_that_is_not_an_artifact_is_never_replaced(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "thesis.tex").write_text("years of work")

    with pytest.raises(distsave.SaveError, match="not a distsave artifact"):
        model_of(1.0).save(tmp_path / "model")
    assert (tmp_path / "model" / "thesis.tex").read_text() == "years of work"
    assert entries(tmp_path) == ["model"]


@contextlib.contextmanager
def unprivileged():
    """Run the block as user nobody when root (root ignores permissions), else as ourselves."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def open_folder():
    """A fresh folder that user nobody may enter (pytest's own folders are private to root)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_a_folder_without_write_permission_is_a_save_error_and_the_artifact_is_kept(open_folder):
    folder = open_folder
    model_of(1.0).save(folder / "model")
    folder.chmod(0o555)
    try:
        with unprivileged(), pytest.raises(distsave.SaveError) as raised:
            model_of(2.0).save(folder / "model")
    finally:
        folder.chmod(0o755)

    assert f"Could not save to '{folder / 'model'}': permission was denied" in str(raised.value)
    assert "save to a folder you can write to, or fix its permissions" in str(raised.value)
    assert saved_weight(folder / "model") == 1.0
    assert entries(folder) == ["model"]


# --- full and read-only disks (real mounts) --------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 1 MiB at a fresh folder, or a skip where this process cannot mount."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_a_save_error_and_the_artifact_is_kept(tmpfs):
    model_of(1.0).save(tmpfs / "model")
    too_big = model_of(2.0, width=2**18)  # 2 MiB of weights for a 1 MiB disk

    with pytest.raises(distsave.SaveError, match="the disk is full.*free space"):
        too_big.save(tmpfs / "model")

    assert saved_weight(tmpfs / "model") == 1.0
    assert entries(tmpfs) == ["model"]


def test_a_read_only_file_system_is_a_save_error_and_the_artifact_is_kept(tmpfs):
    model_of(1.0).save(tmpfs / "model")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        with pytest.raises(distsave.SaveError, match="the file system is read-only.*writable location"):
            model_of(2.0).save(tmpfs / "model")
        assert saved_weight(tmpfs / "model") == 1.0
        assert entries(tmpfs) == ["model"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
