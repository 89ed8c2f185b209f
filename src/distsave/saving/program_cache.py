"""Serving programs kept on disk between processes, for models made only of built-in layers.

``model.save`` exports its serving program from the ``meta`` rebuild of the recorded
architecture (`torch.export`, then decomposition to core ATen): 1-2 s in a fresh process, more
than writing half a gigabyte of weights. When every layer is torch.nn's or distsave's own, that
program depends on nothing but the architecture, the input spec, torch's default dtype and the
code of torch and distsave. So, like ``torch.compile``'s FX graph cache, it is kept under a key
of all of these, and the next process that saves the same architecture reads it instead of
exporting again.

- A model with a registered class of the user's is never cached: its code may change under the
  same name.
- An entry is checked like a program read from an artifact (`program.check_program`). An entry
  that fails the check, or cannot be read, counts as a miss and is replaced.
- The folder (``$DISTSAVE_CACHE_DIR/programs``, default ``~/.cache/distsave/programs``) is made
  private to its user. One that another user owns or may write to is not used.
- The cache only ever saves time: a failed write (a full disk, a read-only home) is skipped.
  ``DISTSAVE_PROGRAM_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import SaveError
from .export_process import helper_modules, programs_from_reply
from .format import MAX_PROGRAM_BYTES
from .signatures import ExportedSignatures

__all__ = ["cache_folder", "entry_path", "read_programs", "store_programs"]

# An entry holds model.save's one signature; anything larger was not written by us.
_MAX_ENTRY_BYTES = 2 * MAX_PROGRAM_BYTES


@functools.cache
def _distsave_code_digest() -> str:
    """sha256 of distsave's own source: an edited checkout gets new keys without a new version."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def cache_folder() -> Path | None:
    """The folder of cached programs, made if missing; None when the cache is off or the folder
    is not private to this user."""
    if os.environ.get("DISTSAVE_PROGRAM_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    root = os.environ.get("DISTSAVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "distsave")
    folder = Path(root) / "programs"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        return None
    return folder


def entry_path(architecture: dict[str, Any], input_spec: list[dict[str, Any]]) -> Path | None:
    """Where the program of this architecture and input spec is cached; None when it must not be
    (a class of the user's, or a layer rebuilt from an artifact) or the cache is off."""
    if helper_modules(architecture) != []:
        return None
    folder = cache_folder()
    if folder is None:
        return None
    try:
        code = _distsave_code_digest()
    except OSError:  # a package folder it cannot read: no key is sound
        return None
    material = {"architecture": architecture, "input_spec": input_spec,
                "default_dtype": str(torch.get_default_dtype()), "torch": torch.__version__,
                "torch_git": getattr(torch.version, "git_version", None), "distsave_code": code}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return folder / f"{key}.json"


def read_programs(path: Path | None) -> ExportedSignatures | None:
    """The serving program cached at ``path`` (from `entry_path`), checked; None on a miss."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size > _MAX_ENTRY_BYTES:
                return None
            reply = json.loads(file.read())
        return programs_from_reply(reply, f"the program cache entry {path}")
    except (OSError, ValueError, SaveError):
        return None


def store_programs(path: Path | None, exported: ExportedSignatures) -> None:
    """Keep ``exported`` (programs without tensor constants) at ``path`` (from `entry_path`) for
    later processes; best effort, and not fsync'd: a lost entry is only exported again."""
    if path is None or exported.constants:
        return
    reply = {"programs": {name: [program, entry] for name, (program, entry, _) in exported.programs.items()}}
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".partial")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(reply, file)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError:
        return
