"""Atomic directory writes: build beside the target, fsync, then swap into place.

On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the target
name holds either the complete old artifact or the complete new one. Elsewhere the old
directory is renamed aside for the instant between two renames; those two renames hold an
exclusive lock on the parent folder so that concurrent savers swap one at a time, and if the
saver dies between them the next save puts the old artifact back first.

Several processes may save to one path at once. Each holds an exclusive ``flock`` on its own
staging folder while it writes, and the clean-up of earlier crashes removes only staging
folders whose lock it can take (their writer is gone), so no saver deletes another's work.
The last swap wins; every swap puts a complete artifact in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import _libc
from .errors import SaveError

__all__ = ["atomic_directory", "fsync_tree"]

_TMP_MARK = ".distsave-tmp-"
_ASIDE = "-old"  # suffix of an old artifact moved aside by a two-rename swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_ATTEMPTS = 16  # tries at a lost race (a fresh staging folder swept, a target that appeared)
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)

_WRITABLE = "save to a folder you can write to, or fix its permissions"
_REASONS = {  # errno -> (what happened, how to fix it)
    errno.ENOSPC: ("the disk is full", "free space on that disk or save to another one"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota or save elsewhere"),
    errno.EROFS: ("the file system is read-only", "save to a writable location"),
    errno.EACCES: ("permission was denied", _WRITABLE),
    errno.EPERM: ("the operation was not permitted", _WRITABLE),
    errno.ELOOP: ("the path is a symbolic link loop", "point the link at a folder, or choose another path"),
}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (inclusive) to stable storage, with the
    permissions a plain write would have given (temporary folders are created private)."""
    mask = _umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)
            _fsync(Path(folder) / name)
        os.chmod(folder, 0o777 & ~mask)
        _fsync(Path(folder))


def _save_error(target: Path, error: OSError, *, swapped: bool = False) -> SaveError:
    reason, fix = _REASONS.get(error.errno, (str(error), "fix the cause and save again"))
    where = f" ({error.strerror}: '{error.filename}')" if error.filename and error.strerror else ""
    state = ("The new artifact is in place but may not be on stable storage yet" if swapped
             else "Any previous artifact there is unchanged")
    return SaveError(f"Could not save to '{target}': {reason}{where}. {state}; {fix}.")


def _resolve(target: str | os.PathLike) -> Path:
    """The real location to write: a symbolic link (``latest -> run-42``) is followed, so the
    artifact it points to is replaced and the link itself is kept."""
    resolved = Path(os.path.realpath(Path(target).absolute()))
    if resolved.is_symlink():  # realpath stops at a loop
        raise _save_error(Path(target), OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(target)))
    return resolved


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        file = next((p for p in reversed(target.parents) if p.exists() and not p.is_dir()),
                    error.filename)
        raise SaveError(f"Expected the parents of '{target}' to be folders. Received: '{file}', "
                        "which is a file. Choose another path or move that file away.") from error


def _check_replaceable(target: Path, is_ours: Callable[[Path], bool]) -> None:
    if target.exists() and not target.is_dir():
        raise SaveError(f"Expected a directory path to save to. Received: path='{target}', which "
                        "is an existing file. Choose another path.")
    if target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise SaveError(f"Refusing to replace '{target}': it is a non-empty folder that is not a "
                        "distsave artifact. Choose another path or remove it yourself.")


def _open_directory(path: Path) -> int | None:
    try:
        return os.open(path, _DIRECTORY_FLAGS)
    except OSError:  # gone, a link or not a folder: not a staging folder we can claim
        return None


def _lock(fd: int) -> bool:
    """Take the exclusive lock on an open folder without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_at(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the folder open as ``fd`` (not swept or swapped away)."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def _staging_folders(target: Path) -> list[Path]:
    prefix = f".{target.name}{_TMP_MARK}"
    with os.scandir(target.parent) as entries:
        return [Path(entry.path) for entry in entries if entry.name.startswith(prefix)]


def _restore_moved_aside(leftover: Path, target: Path) -> bool:
    """Put back an old artifact that a two-rename swap moved aside before its saver died."""
    if not leftover.name.endswith(_ASIDE):
        return False
    with _folder_lock(target.parent):  # no live saver is between its two renames
        if os.path.lexists(target) or not os.path.lexists(leftover):
            return False
        os.rename(leftover, target)
        return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove staging folders left by savers that died; skip those whose writer still holds them."""
    for leftover in _staging_folders(target):
        fd = _open_directory(leftover)
        if fd is None:
            continue
        try:
            if _lock(fd) and _still_at(leftover, fd) and not _restore_moved_aside(leftover, target):
                shutil.rmtree(leftover, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked_staging(target: Path) -> Iterator[Path]:
    """A new empty staging folder beside ``target``, locked by this saver until the exit, which
    removes whatever is left at its name (a failed write, or the replaced old artifact)."""
    for _ in range(_ATTEMPTS):
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent))
        except OSError as error:
            raise _save_error(target, error) from error
        fd = _open_directory(staging)
        if fd is not None and _lock(fd) and _still_at(staging, fd):
            break
        if fd is not None:  # another saver's clean-up swept it before we locked it
            os.close(fd)
    else:
        raise SaveError(f"Could not save to '{target}': other savers kept removing its staging "
                        "folder. Any previous artifact there is unchanged; save again.")
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_renameat2 = _libc.function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])


def _exchange(a: Path, b: Path) -> bool:
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the file system cannot swap; fall back to two renames
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _swap_by_two_renames(staging: Path, target: Path) -> None:
    with _folder_lock(target.parent):  # one two-rename swap at a time in this folder
        if os.path.lexists(target):
            aside = staging.with_name(staging.name + _ASIDE)
            os.rename(target, aside)
            os.rename(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staging, target)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; what ``target`` held is left at ``staging``'s name."""
    for _ in range(_ATTEMPTS):
        try:
            if not _exchange(staging, target):
                _swap_by_two_renames(staging, target)
            return
        except FileNotFoundError:  # nothing at target to swap with: move in
            try:
                os.rename(staging, target)
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise  # else another saver moved in first: swap with its artifact
    raise OSError(errno.EBUSY, "other savers kept replacing it", str(target))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, is_ours: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty staging folder; on clean exit it replaces ``target`` atomically.

    Concurrent saves to one path each succeed (the last swap wins) and never remove one
    another's staging folder. A symbolic link at ``target`` (``latest -> run-42``) is followed:
    the artifact it points to is replaced and the link stays; a dangling link gets the folder
    it names created.

    Args:
        target: Where the finished directory will live.
        is_ours: Tells whether an existing directory may be replaced (a distsave artifact).

    Raises:
        SaveError: ``target`` is a file, or a folder that is not a distsave artifact, or a
            parent is a file, or writing failed (full disk, read-only file system, permission
            denied…); the message names the path and the fix, and the previous artifact is
            left as it was.
    """
    target = _resolve(target)
    try:
        _check_replaceable(target, is_ours)
        _make_parent(target)
        _remove_stale_temporaries(target)
    except OSError as error:
        raise _save_error(target, error) from error
    with _locked_staging(target) as staging:
        try:
            yield staging
            fsync_tree(staging)
            _swap_into_place(staging, target)
        except OSError as error:
            raise _save_error(target, error) from error
        try:
            _fsync(target.parent)
        except OSError as error:
            raise _save_error(target, error, swapped=True) from error
