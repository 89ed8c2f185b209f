"""The versions of one served model: find, load (with every check), swap atomically.

TF Serving's layout: ``PATH/1/``, ``PATH/2/``, … (numbered artifact folders). The highest
version is loaded before the server starts listening; a poller thread loads any higher version
that appears, fully (checksums, operator allowlist, warm-up calls) and only then replaces the
served one in a single reference swap. Requests that already hold the old version finish on
it, so none fails during the change. A ``PATH`` that is itself an artifact is served as
version 1 and never polled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import saved_model
from ..saving.errors import ArtifactError
from ..saving.format import MANIFEST
from ..saving.storage import download_artifact, is_remote, local_path
from ..strategies import OneDeviceStrategy
from ..training.specs import TensorSpec
from .batching import SignatureRunner
from .codec import ServingError, bad_request
from .config import ServeConfig
from .metadata import SignatureInfo, describe_signature

__all__ = ["ModelRepository", "ServedVersion"]

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"^[0-9]{1,18}$")


@dataclass
class ServedVersion:
    """One loaded version: its signatures, their descriptions and their runners."""

    version: int
    loaded: saved_model.LoadedModel
    info: dict[str, SignatureInfo]
    runners: dict[str, SignatureRunner]

    def inputs_of(self, signature_name: str) -> list[TensorSpec]:
        if signature_name not in self.runners:
            raise bad_request(f'Serving signature name: "{signature_name}" not found in signature def. '
                              f"Available: {sorted(self.runners)}.")
        return self.runners[signature_name].signature.inputs

    def signature_defs(self) -> dict[str, Any]:
        return {name: info.signature_def for name, info in self.info.items()}


@contextlib.contextmanager
def _local(path: str) -> Iterator[Path]:
    if is_remote(path):
        with download_artifact(path) as local:
            yield local
    else:
        yield local_path(path)


class _Layout:
    """Where versions live: a single artifact, or numbered folders (local or remote)."""

    def __init__(self, path: str):
        self.path = path.rstrip("/") if is_remote(path) else str(local_path(path))
        self._fs = None
        if is_remote(path):
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.path)

    def _exists(self, relative: str) -> bool:
        if self._fs is not None:
            self._fs.invalidate_cache(self._root)
            return self._fs.exists(f"{self._root}/{relative}")
        return (Path(self.path) / relative).is_file()

    @property
    def single(self) -> bool:
        return self._exists(MANIFEST)

    def versions(self) -> list[int]:
        """Numbered version folders that hold a manifest, lowest first."""
        if self._fs is not None:
            names = [p.rstrip("/").rpartition("/")[2] for p in self._fs.ls(self._root, detail=False)]
        else:
            try:
                names = os.listdir(self.path)
            except FileNotFoundError:
                raise ArtifactError(f"Nothing to serve: '{self.path}' does not exist. Pass a directory "
                                    "that model.save / saved_model.save wrote, or a folder of numbered "
                                    "versions (1/, 2/, ...).") from None
        return sorted(int(n) for n in names if _VERSION.match(n) and self._exists(f"{n}/{MANIFEST}"))

    def location(self, version: int | None) -> str:
        if version is None:
            return self.path
        return f"{self.path}/{version}" if self._fs is not None else str(Path(self.path) / str(version))


class ModelRepository:
    """The served versions of one model; `current` is the one predict uses by default."""

    def __init__(self, config: ServeConfig, executor: Executor,
                 on_batch: Callable[[str, int], None] | None = None):
        self.config = config
        self._executor = executor
        self._on_batch = on_batch or (lambda signature, rows: None)
        self._layout = _Layout(config.path)
        self._single = self._layout.single
        self.failed: dict[int, str] = {}
        self.current = self._load(None if self._single else self._latest_or_fail())
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def _latest_or_fail(self) -> int:
        versions = self._layout.versions()
        if not versions:
            raise ArtifactError(f"Nothing to serve in '{self._layout.path}': it has no {MANIFEST} and no "
                                "numbered version folders (1/, 2/, ...) holding one. Pass the directory "
                                "model.save or saved_model.save wrote, or save into PATH/1.")
        return versions[-1]

    def _load(self, version: int | None) -> ServedVersion:
        where = self._layout.location(version)
        with _local(where) as local, OneDeviceStrategy(self.config.device).scope():
            loaded = saved_model.load(local)
        if not loaded.signatures:
            raise ArtifactError(f"'{where}' has no signatures to serve. Save it with model.save, or "
                                "with saved_model.save and an input_spec or signatures=.")
        info = {name: describe_signature(sig) for name, sig in loaded.signatures.items()}
        runners = {name: SignatureRunner(
            sig, self._executor, max_batch_size=self.config.max_batch_size,
            timeout=self.config.batch_timeout_ms / 1000, batchable=info[name].batchable,
            on_batch=lambda rows, name=name: self._on_batch(name, rows))
            for name, sig in loaded.signatures.items()}
        logger.info("loaded %s (version %s): signatures %s", where, version or 1, sorted(runners))
        return ServedVersion(version or 1, loaded, info, runners)

    def get(self, name: str, version: int | None = None) -> ServedVersion:
        """The version serving ``name`` (the current one unless ``version`` is given).

        Raises:
            ServingError: 404, as TF Serving, for another model name or a version not loaded.
        """
        served = self.current
        if name != self.config.name:
            raise ServingError(404, f"Servable not found for request: Latest({name})")
        if version is not None and version != served.version:
            raise ServingError(404, f"Servable not found for request: Specific({name}, {version})")
        return served

    def poll_once(self) -> bool:
        """Load a version higher than the current one if one appeared; True if it swapped."""
        if self._single:
            return False
        newer = [v for v in self._layout.versions() if v > self.current.version]
        for version in reversed(newer):
            try:
                loaded = self._load(version)
            except (ArtifactError, OSError, ValueError) as error:
                if self.failed.get(version) != str(error):
                    logger.warning("version %s of %s not loaded (still serving %s): %s", version,
                                   self.config.name, self.current.version, error)
                self.failed[version] = str(error)
                continue
            self.current = loaded  # one reference swap: requests see the old or the new version
            self.failed.pop(version, None)
            return True
        return False

    def start_polling(self) -> None:
        if self._single or self.config.poll_seconds <= 0 or self._poller is not None:
            return
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll_forever, name="distsave-version-poller",
                                        daemon=True)
        self._poller.start()

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # a broken store must not end polling; the next poll retries
                logger.exception("polling %s for new versions failed", self._layout.path)

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None

    def status(self, version: int | None = None) -> dict[str, Any]:
        """TF Serving's ``GetModelStatus`` answer; failed newer versions are listed as END."""
        served = self.current
        rows = [{"version": str(served.version), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}}]
        rows += [{"version": str(v), "state": "END",
                  "status": {"error_code": "INVALID_ARGUMENT", "error_message": message}}
                 for v, message in sorted(self.failed.items())]
        if version is not None:
            rows = [r for r in rows if r["version"] == str(version)]
            if not rows:
                raise ServingError(404, f"Could not find version {version} of model {self.config.name}")
        return {"model_version_status": rows}
