"""The artifact's table of contents: format, versions, content, and a checksum per file.

Reading validates everything before any tensor is used and reports every problem at once,
each naming its file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import safetensors
import torch

from .errors import ArtifactError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "read_manifest", "write_manifest", "is_artifact"]

FORMAT_NAME = "distsave"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 * 2**20
# Everything an artifact may hold besides the manifest: safetensors and JSON, by known names.
_KNOWN_FILE = re.compile(r"^((model|optimizer|constants)(-\d{5}-of-\d{5})?\.safetensors"
                         r"|(model|optimizer|constants)\.safetensors\.index\.json"
                         r"|signatures/[A-Za-z0-9_.-]+\.json)$")
_CHUNK = 2**22


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"distsave": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _relative_files(root: Path) -> list[str]:
    names = []
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` listing every other file in ``directory`` with size and sha256."""
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "written_by": _versions(),
                **content,
                "files": {rel: {"bytes": (directory / rel).stat().st_size,
                                "sha256": sha256_of(directory / rel)}
                          for rel in _relative_files(directory)}}
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


def is_artifact(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def _safe_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and "." not in parts


def read_json_object(file: Path, max_bytes: int, what: str) -> dict[str, Any]:
    """A JSON object from an artifact file, refusing oversized or malformed content."""
    if file.stat().st_size > max_bytes:
        raise ArtifactError(f"{file} is larger than {max_bytes} bytes; refusing it.")
    try:
        content = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{file} is not valid JSON ({error}); the artifact is corrupted.") from None
    if not isinstance(content, dict):
        raise ArtifactError(f"{file} is not a {what} (expected a JSON object).")
    return content


def read_manifest(path: str | os.PathLike, *, verify_checksums: bool = True) -> dict[str, Any]:
    """Read and validate an artifact's manifest and files.

    Raises:
        ArtifactError: naming each file that is missing, extra, resized, altered or unsafe.
    """
    root = Path(path)
    if not root.is_dir():
        what = "a file" if root.exists() else "missing"
        raise ArtifactError(f"Expected a distsave artifact directory with {MANIFEST}. Received: "
                            f"path='{root}' ({what}). Pass the directory that model.save or "
                            "saved_model.save wrote.")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise ArtifactError(f"'{root}' has no {MANIFEST}, so it is not a distsave artifact (or it is "
                            "incomplete). Pass the directory that model.save or saved_model.save wrote.")
    manifest = read_json_object(manifest_path, _MAX_MANIFEST_BYTES, "distsave manifest")
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{manifest_path} does not describe a distsave artifact (format "
                            f"{manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path} has format_version {version!r}; this distsave reads "
                            f"up to {FORMAT_VERSION}. Upgrade distsave to load it.")
    if manifest.get("manifest_sha256") != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise ArtifactError(f"{manifest_path} was modified after it was written (its checksum does "
                            "not match its content). Restore the original manifest.")
    _check_files(root, manifest.get("files"), verify_checksums)
    return manifest


def _check_files(root: Path, files: Any, verify_checksums: bool) -> None:
    if not isinstance(files, dict):
        raise ArtifactError(f"{root / MANIFEST} has no valid 'files' table.")
    problems = []
    for name, entry in files.items():
        if not _safe_relative(name):
            problems.append(f"{name!r}: path is not a plain relative path inside the artifact")
            continue
        if not _KNOWN_FILE.match(name):
            problems.append(f"{name}: not a file distsave writes (only safetensors and JSON, by known names)")
            continue
        file = root / name
        try:
            info = file.lstat()
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not a regular file (symlinks and devices are refused)")
        elif not isinstance(entry, dict) or info.st_size != entry.get("bytes"):
            problems.append(f"{name}: size is {info.st_size} bytes, manifest says "
                            f"{entry.get('bytes') if isinstance(entry, dict) else entry!r}")
        elif verify_checksums and sha256_of(file) != entry.get("sha256"):
            problems.append(f"{name}: content changed (sha256 does not match the manifest)")
    for extra in sorted(set(_relative_files(root)) - set(files)):
        problems.append(f"{extra}: not listed in the manifest (an extra file)")
    if problems:
        raise ArtifactError(f"Artifact '{root}' failed validation:\n  - " + "\n  - ".join(problems)
                            + "\nRe-save the model, or restore the artifact from a good copy.")
