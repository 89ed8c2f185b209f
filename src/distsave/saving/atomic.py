"""Atomic directory writes: build beside the target, fsync, then swap into place.

On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the target
name holds either the complete old artifact or the complete new one. Elsewhere the old
directory is renamed aside for the instant between two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SaveError

__all__ = ["atomic_directory", "fsync_tree"]

_TMP_MARK = ".distsave-tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the file system cannot swap; fall back to two renames
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _remove_stale_temporaries(target: Path) -> None:
    for leftover in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, is_ours: callable) -> Iterator[Path]:
    """Yield an empty temporary folder; on clean exit it replaces ``target`` atomically.

    Args:
        target: Where the finished directory will live.
        is_ours: Tells whether an existing directory may be replaced (a distsave artifact).

    Raises:
        SaveError: ``target`` is a file, or a folder that is not a distsave artifact, or the
            write failed (full disk…); the previous artifact is left as it was.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise SaveError(f"Expected a directory path to save to. Received: path='{target}', which "
                        "is an existing file. Choose another path.")
    if target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise SaveError(f"Refusing to replace '{target}': it is a non-empty folder that is not a "
                        "distsave artifact. Choose another path or remove it yourself.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            if _exchange(staging, target):
                shutil.rmtree(staging)
            else:
                aside = staging.with_name(staging.name + "-old")
                os.rename(target, aside)
                os.rename(staging, target)
                shutil.rmtree(aside)
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise SaveError(f"Could not write the artifact '{target}': {error}. Any previous artifact "
                        "there is unchanged; fix the cause (e.g. free disk space) and save again.") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
