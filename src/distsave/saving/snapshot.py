"""One consistent, checked view of an artifact on disk, for every loader.

Opening a snapshot opens the artifact directory once, reads and validates the manifest, and
opens every listed file relative to that directory (no symlinks, regular files only, sizes as
listed) before anything is parsed. Each file is then read once, its checksum computed on the
very bytes that are used. A save that swaps the directory meanwhile cannot mix two artifacts:
the open files are the old artifact's; if the swap happened while files were being opened, the
snapshot is taken again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checksum import for_version
from .errors import ArtifactError
from .format import (MANIFEST, MAX_INDEX_BYTES, MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, check_format,
                     chunk_starts, index_file, shard_file, single_file, validate_manifest)
from .mapped import map_files
from .tensor_io import TensorEntry, TensorFile, parse_header, read_files

__all__ = ["Snapshot", "parse_json", "canonical_manifest_bytes"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_ATTEMPTS = 5


def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes ``manifest_sha256`` covers: every field but itself, canonically ordered."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def parse_json(data: bytes, where: str) -> Any:
    """Parse JSON, refusing malformed text and nesting deeper than `MAX_JSON_DEPTH`."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ArtifactError(f"{where} is not valid JSON ({detail}); the artifact is corrupted.") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ArtifactError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; refusing it.")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


class _Retry(Exception):
    """The directory changed while the snapshot was being taken."""


class Snapshot:
    """An artifact opened for reading. Use as a context manager; `open` is the constructor.

    Attributes:
        root: The artifact's path.
        manifest: The validated manifest.
        checksum: What its files' digests are (by format version).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], files: dict[str, tuple[int, int]]):
        self.root, self.manifest = root, manifest
        self.checksum = for_version(manifest["format_version"])
        self._files = files  # name -> (fd, size)
        self._verified: set[str] = set()
        self._headers: dict[str, TensorFile] = {}
        self._stems: dict[str, tuple[list[str], dict[str, TensorEntry]]] = {}  # stem -> files, entries
        self._shared: set[str] = set()  # files read in part here, the rest by other processes

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> Snapshot:
        """Open and validate the artifact at ``path``.

        Raises:
            ArtifactError: not an artifact, a malformed manifest, or files that are missing,
                extra, resized or not regular files (every problem listed, each naming its file).
        """
        root = Path(path)
        for _ in range(_ATTEMPTS):
            try:
                return cls._open_once(root)
            except _Retry:
                continue
        raise ArtifactError(f"'{root}' kept changing while it was opened ({_ATTEMPTS} tries); another "
                            "process is re-saving it. Load again when the saves stop.")

    @classmethod
    def _open_once(cls, root: Path) -> Snapshot:
        try:
            dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ArtifactError(f"Expected a distsave artifact directory with {MANIFEST}. Received: "
                                f"path='{root}' (missing). Pass the directory that model.save or "
                                "saved_model.save wrote.") from None
        except NotADirectoryError:
            raise ArtifactError(f"Expected a distsave artifact directory with {MANIFEST}. Received: "
                                f"path='{root}' (a file). Pass the directory that model.save or "
                                "saved_model.save wrote.") from None
        except OSError as error:
            raise ArtifactError(f"Cannot open the artifact '{root}': {error.strerror}.") from None
        files: dict[str, tuple[int, int]] = {}
        try:
            try:
                manifest = cls._read_manifest(root, dir_fd)
            except ArtifactError:
                if _replaced(root, dir_fd):  # a save swapped the directory and removed the old one
                    raise _Retry from None
                raise
            problems = []
            for name, entry in manifest["files"].items():
                try:
                    fd, size = _open_regular(dir_fd, name)
                except _Missing:
                    problems.append(f"{name}: missing")
                    continue
                except _NotRegular:
                    problems.append(f"{name}: not a regular file (symlinks, devices and folders are refused)")
                    continue
                files[name] = (fd, size)
                if size != entry["bytes"]:
                    problems.append(f"{name}: size is {size} bytes, manifest says {entry['bytes']}")
            problems += [f"{extra}: not listed in the manifest (an extra file)"
                         for extra in sorted(_listed_names(dir_fd) - set(manifest["files"]) - {MANIFEST})]
            snapshot = cls(root, manifest, files)
            if problems:
                if any(p.endswith(": missing") for p in problems) and _replaced(root, dir_fd):
                    raise _Retry
                problems += snapshot._content_problems(skip={p.split(":")[0] for p in problems})
                raise _failed(root, problems)
            return snapshot
        except BaseException:
            for fd, _ in files.values():
                os.close(fd)
            raise
        finally:
            os.close(dir_fd)

    @staticmethod
    def _read_manifest(root: Path, dir_fd: int) -> dict[str, Any]:
        where = str(root / MANIFEST)
        try:
            fd, size = _open_regular(dir_fd, MANIFEST)
        except _Missing:
            raise ArtifactError(f"'{root}' has no {MANIFEST}, so it is not a distsave artifact (or it "
                                "is incomplete). Pass the directory that model.save or "
                                "saved_model.save wrote.") from None
        except _NotRegular:
            raise ArtifactError(f"{where} is not a regular file; refusing it.") from None
        try:
            if size > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"{where} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit; refusing it.")
            data = _read_exactly(fd, size, where)
        finally:
            os.close(fd)
        manifest = check_format(parse_json(data, where), where)
        if manifest["manifest_sha256"] != hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest():
            raise ArtifactError(f"{where} was modified after it was written (its checksum does not "
                                "match its content). Restore the original manifest.")
        return validate_manifest(manifest, where)

    # -- reading --------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return sorted(self._files)

    def _digests(self, name: str) -> tuple[list[str], list[int]]:
        """A file's chunk digests (of `self.checksum`) and where each chunk starts."""
        entry = self.manifest["files"][name]
        if self.manifest["format_version"] == 1:  # one digest for the whole file
            return [entry[self.checksum.field]], [0]
        return entry[self.checksum.field], chunk_starts(entry["bytes"], entry.get("chunk_starts"))

    def read_bytes(self, name: str, max_bytes: int) -> bytes:
        """A whole (small) file, checked against its checksums."""
        fd, size = self._files[name]
        if size > max_bytes:
            raise ArtifactError(f"{self.root / name} is {size} bytes, over the {max_bytes}-byte limit; refusing it.")
        data = _read_exactly(fd, size, str(self.root / name))
        digests, starts = self._digests(name)
        bad = [i for i, (a, b) in enumerate(zip(starts, starts[1:] + [size]))
               if self.checksum.of(data[a:b]) != digests[i]]
        if bad:
            raise self._changed(name, bad)
        self._verified.add(name)
        return data

    def read_json(self, name: str, max_bytes: int) -> Any:
        return parse_json(self.read_bytes(name, max_bytes), str(self.root / name))

    def tensor_files(self, stem: str) -> dict[str, TensorEntry]:
        """Every tensor stored under ``stem`` (one file or shards), by name, headers checked."""
        if stem not in self._stems:
            self._stems[stem] = self._stem_files(stem)
        return dict(self._stems[stem][1])

    def _stem_files(self, stem: str) -> tuple[list[str], dict[str, TensorEntry]]:
        if self.has(single_file(stem)):
            return [single_file(stem)], dict(self._header(single_file(stem)).entries)
        index = index_file(stem)
        if not self.has(index):
            raise ArtifactError(f"'{self.root}' has neither {single_file(stem)} nor {index}.")
        content = self.read_json(index, MAX_INDEX_BYTES)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ArtifactError(f"{self.root / index}: field 'weight_map' should map tensor names to "
                                "shard file names.")
        shards = sorted(set(weight_map.values()), key=str)
        expected = [shard_file(stem, i, len(shards)) for i in range(len(shards))]
        if shards != expected or not all(self.has(s) for s in shards):
            raise ArtifactError(f"{self.root / index} names shards {shards[:4]}; expected {expected[:4]} "
                                "(all listed in the manifest).")
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            for key, entry in self._header(shard).entries.items():
                if weight_map.get(key) != shard or key in entries:
                    raise ArtifactError(f"{self.root / shard} holds {key!r}, which {index} places elsewhere.")
                entries[key] = entry
        if set(entries) != set(weight_map):
            missing = sorted(set(weight_map) - set(entries))[:5]
            raise ArtifactError(f"{self.root / index} lists tensors no shard holds: {missing}.")
        return shards, entries

    def _header(self, name: str) -> TensorFile:
        if name not in self._headers:
            fd, size = self._files[name]
            self._headers[name] = parse_header(str(self.root / name), fd, size)
        return self._headers[name]

    def file_of(self, stem: str, entry_name: str) -> str:
        """The file (single or shard) that holds tensor ``entry_name`` of ``stem``."""
        return next(name for name in self._files_of(stem) if entry_name in self._headers[name].entries)

    def read_tensors(self, destinations: dict[str, dict[str, torch.Tensor]]) -> None:
        """Fill ``destinations`` (``stem -> name -> tensor``: every tensor stored under each
        stem, matching dtype and shape, contiguous, on any device) from the files, all at once,
        verifying every chunk's checksum."""
        for stem, tensors in destinations.items():
            if set(tensors) != set(self.tensor_files(stem)):
                raise ValueError(f"destinations must name every tensor stored under {stem!r}")
        self._read({stem: {key: (tensor, 0) for key, tensor in tensors.items()}
                    for stem, tensors in destinations.items()}, self._verified)

    def read_tensor_slices(self, slices: dict[str, dict[str, tuple[torch.Tensor, int]]]) -> None:
        """Fill each destination with its byte size of a stored tensor's bytes from a first byte
        (``stem -> name -> (destination, first byte)``): the slices one process of several
        owns. Only the chunks holding them are read and checked; the other processes check the
        rest, so `verify_remaining` leaves these files to them."""
        for stem, wanted in slices.items():
            unknown = sorted(set(wanted) - set(self.tensor_files(stem)))
            if unknown:
                raise ValueError(f"no tensors named {unknown[:3]} stored under {stem!r}")
        self._read(slices, self._shared)

    def _read(self, slices: dict[str, dict[str, tuple[torch.Tensor, int]]], done: set[str]) -> None:
        """Read every file of the stems in ``slices`` at once, checking every chunk read; each
        file then joins ``done``."""
        names = [name for stem in slices for name in self._stems[stem][0]]
        jobs = []
        for stem in slices:
            for name in self._stems[stem][0]:
                header = self._headers[name]
                jobs.append((header, {key: slices[stem][key] for key in header.entries if key in slices[stem]},
                             *self._digests(name)))
        for name, bad in zip(names, read_files(jobs, self.checksum)):
            if bad:
                raise self._changed(name, bad)
        done.update(names)

    def map_tensors(self, stems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Every tensor stored under each stem, on the CPU, backed by a private mapping of its
        file (`mapped.map_files`), every chunk of every file checked first."""
        names = {stem: self._files_of(stem) for stem in stems}
        jobs = [(self._headers[name], *self._digests(name)) for stem in stems for name in names[stem]]
        results = iter(map_files(jobs, self.checksum))
        mapped: dict[str, dict[str, torch.Tensor]] = {}
        for stem in stems:
            mapped[stem] = {}
            for name in names[stem]:
                tensors, bad = next(results)
                if bad:
                    raise self._changed(name, bad)
                mapped[stem].update(tensors)
        self._verified.update(name for stem in stems for name in names[stem])
        return mapped

    def _files_of(self, stem: str) -> list[str]:
        """The files (single or shards) of ``stem``, their headers parsed and checked."""
        self.tensor_files(stem)
        return self._stems[stem][0]

    def allocate_and_read(self, stem: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor under ``stem``, freshly allocated (sizes bounded by the files) and read."""
        entries = self.tensor_files(stem)
        tensors = {k: torch.empty(e.shape, dtype=e.dtype, device=device) for k, e in entries.items()}
        self.read_tensors({stem: tensors})
        return tensors

    @contextlib.contextmanager
    def damage_first(self) -> Iterator[None]:
        """Report damage before anything else: if the work inside fails (a header that does not
        parse, names that do not match), check the files not yet verified, and if one was
        altered, say that instead — the other error is only a consequence."""
        try:
            yield
        except Exception as error:  # re-raised unless damage explains it
            problems = self._content_problems(skip=self._verified)
            if problems:
                raise _failed(self.root, problems) from error
            raise

    def verify_remaining(self) -> None:
        """Check the checksums of every file not read yet (so a load checks the whole artifact)."""
        problems = self._content_problems(skip=self._verified | self._shared)
        if problems:
            raise _failed(self.root, problems)

    def _content_problems(self, skip: set[str]) -> list[str]:
        problems = []
        for name, (fd, size) in sorted(self._files.items()):
            if name in skip:
                continue
            digests, starts = self._digests(name)
            for index, (start, end) in enumerate(zip(starts, starts[1:] + [size])):
                data = os.pread(fd, max(end - start, 0), start)
                if self.checksum.of(data) != digests[index]:
                    problems.append(f"{name}: content changed ({self.checksum.field} does not match the manifest)")
                    break
            else:
                self._verified.add(name)
        return problems

    def _changed(self, name: str, chunks: list[int]) -> ArtifactError:
        return _failed(self.root, [f"{name}: content changed ({self.checksum.field} does not match the manifest, "
                                   f"in chunk(s) {chunks[:5]})"])

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files = {}

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failed(root: Path, problems: list[str]) -> ArtifactError:
    return ArtifactError(f"Artifact '{root}' failed validation:\n  - " + "\n  - ".join(problems)
                         + "\nRe-save the model, or restore the artifact from a good copy.")


class _Missing(Exception):
    pass


class _NotRegular(Exception):
    pass


def _open_regular(dir_fd: int, name: str) -> tuple[int, int]:
    """Open ``name`` (relative, '/'-separated) under ``dir_fd`` following no symlink; a regular
    file only. Raises `_Missing` or `_NotRegular` (symlink, device, FIFO, folder, unreadable)."""
    parts = name.split("/")
    current, opened = dir_fd, []
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                current = os.open(part, _OPEN_FLAGS | (0 if last else os.O_DIRECTORY), dir_fd=current)
            except FileNotFoundError:
                raise _Missing from None
            except OSError:
                raise _NotRegular from None
            opened.append(current)
        info = os.fstat(current)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegular
        opened.pop()
        return current, info.st_size
    finally:
        for fd in opened:
            os.close(fd)


def _read_exactly(fd: int, size: int, where: str) -> bytes:
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise ArtifactError(f"{where} changed while it was read; load again once no one writes it.")
    return data


def _listed_names(dir_fd: int) -> set[str]:
    """Every entry under the directory (files, links, folders' contents), as relative names."""
    names = set()
    for folder, dirs, files, _ in os.fwalk(".", dir_fd=dir_fd, follow_symlinks=False):
        prefix = "" if folder == "." else folder.removeprefix("./") + "/"
        names.update(prefix + f for f in files)
        names.update(prefix + d for d in dirs if d not in ("signatures",) or prefix)
    return names


def _replaced(root: Path, dir_fd: int) -> bool:
    """Whether ``root`` now names another directory than the one opened."""
    try:
        now, then = os.stat(root), os.fstat(dir_fd)
    except OSError:
        return True
    return (now.st_ino, now.st_dev) != (then.st_ino, then.st_dev)

