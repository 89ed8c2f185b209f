"""Artifacts on remote stores (``s3://``, ``gs://``, ``memory://``, …) through fsspec.

A remote artifact is never read or written in place. Saving writes an ordinary local artifact
(atomic, checksummed) and then uploads it file by file with the manifest **last**; an object
store makes each upload appear whole, so a reader sees either the previous manifest (removed
before the first file is replaced), no manifest, or the new manifest with every file it lists
already in place. Loading downloads the files the manifest lists into a local temporary
directory (refusing unsafe names and files larger than the manifest says) and then runs the
normal local load, which verifies every checksum; files changed mid-download fail that check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError, SaveError
from .format import MANIFEST
from .manifest import read_manifest

__all__ = ["download_artifact", "is_remote", "local_path", "remote_destination", "upload_artifact"]

logger = logging.getLogger(__name__)

_MAX_MANIFEST_BYTES = 64 * 2**20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL other than ``file://`` (which is a local path)."""
    match = _SCHEME.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return bool(match) and match.group(1).lower() != "file"


def local_path(path: str | os.PathLike) -> Path:
    """A local path for a plain path or a ``file://`` URL."""
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"Remote paths such as '{url}' need fsspec: pip install 'distsave[remote]' "
                          "(and the store's package, e.g. s3fs for s3://, gcsfs for gs://).") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise ImportError(f"'{url}' needs a package fsspec did not find: {error}") from None
    return fs, root.rstrip("/")


def _join(root: str, relative: str) -> str:
    return f"{root}/{relative}"


def upload_artifact(local_dir: str | os.PathLike, url: str) -> None:
    """Upload a complete local artifact to ``url``: every file first, the manifest last.

    An old manifest at ``url`` is removed before the first file is replaced, so a save killed
    half-way leaves no manifest a reader would trust.

    Raises:
        SaveError: ``local_dir`` is not a complete, valid artifact.
    """
    try:
        manifest = read_manifest(local_dir)
    except ArtifactError as error:
        raise SaveError(f"Refusing to upload '{local_dir}' to '{url}': {error}") from None
    fs, root = _filesystem(url)
    remote_manifest = _join(root, MANIFEST)
    if fs.exists(remote_manifest):
        fs.rm_file(remote_manifest)
    for relative in manifest["files"]:
        target = _join(root, relative)
        fs.makedirs(target.rpartition("/")[0], exist_ok=True)
        fs.put_file(os.path.join(local_dir, relative), target)
    fs.makedirs(root, exist_ok=True)
    fs.put_file(os.path.join(local_dir, MANIFEST), remote_manifest)
    fs.invalidate_cache(root)
    logger.info("uploaded %d files and %s to %s", len(manifest["files"]), MANIFEST, url)


def _checked_name(name: Any, url: str) -> str:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or not all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts):
        raise ArtifactError(f"{url}/{MANIFEST} lists {name!r}, which is not a plain relative file "
                            "name; refusing to download it.")
    return name


def _fetch_manifest(fs: Any, root: str, url: str) -> bytes:
    remote_manifest = _join(root, MANIFEST)
    if not fs.exists(remote_manifest):
        raise ArtifactError(f"'{url}' has no {MANIFEST}, so it is not a distsave artifact (or its upload "
                            "is incomplete or was interrupted). Pass the URL that model.save wrote.")
    if fs.size(remote_manifest) > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{url}/{MANIFEST} is larger than {_MAX_MANIFEST_BYTES} bytes; refusing it.")
    return fs.cat_file(remote_manifest)


@contextlib.contextmanager
def download_artifact(url: str) -> Iterator[Path]:
    """Download the artifact at ``url`` into a temporary directory; yield its local path.

    Only the files the manifest lists are fetched, each after checking its name and that its
    remote size is the one the manifest records. The caller loads the directory with the
    normal (checksum-verifying) loader; the directory is deleted when the block exits.

    Raises:
        ArtifactError: no manifest, an unsafe name, or a file whose size differs.

    Example:
        >>> with download_artifact("s3://bucket/run/model") as local:
        ...     loaded = distsave.saved_model.load(local)
    """
    fs, root = _filesystem(url)
    fs.invalidate_cache(root)
    raw = _fetch_manifest(fs, root, url)
    try:
        files = json.loads(raw).get("files")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        raise ArtifactError(f"{url}/{MANIFEST} is not a valid distsave manifest (no 'files' table).")
    with tempfile.TemporaryDirectory(prefix="distsave-download-") as tmp:
        local = Path(tmp) / "artifact"
        local.mkdir()
        for name, entry in files.items():
            relative = _checked_name(name, url)
            source = _join(root, relative)
            expected = entry.get("bytes") if isinstance(entry, dict) else None
            size = fs.size(source) if fs.exists(source) else None
            if size is None or size != expected:
                raise ArtifactError(f"{url}/{relative}: remote size is {size} bytes, the manifest says "
                                    f"{expected!r}; the artifact is incomplete or being rewritten.")
            (local / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(source, str(local / relative))
        (local / MANIFEST).write_bytes(raw)
        yield local


@contextlib.contextmanager
def remote_destination(url: str) -> Iterator[Path]:
    """A local directory to save into; uploaded to ``url`` when the block exits cleanly.

    Nothing is uploaded if the block raises, or if nothing was saved there (a replica other
    than the chief).

    Example:
        >>> with remote_destination("s3://bucket/run/model") as local:
        ...     save_model(model, local)
    """
    with tempfile.TemporaryDirectory(prefix="distsave-upload-") as tmp:
        local = Path(tmp) / "artifact"
        yield local
        if (local / MANIFEST).is_file():
            upload_artifact(local, url)
