"""Saves that finish in the background: ``model.save(path, blocking=False)``.

The caller's thread only copies the tensors into host memory (page-locked buffers on a GPU,
reused from one save to the next, so a checkpoint costs one device-to-host copy) and returns;
a background thread writes, checksums, fsyncs and swaps the artifact into place. One save is in
flight at a time: a new save first waits for the previous one, and an error in the background is
raised by the next `save` or `wait_for_saves` with its original message. The interpreter waits
for a save in flight before it exits.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SaveError

__all__ = ["SaveHandle", "host_copies", "start", "wait_for_saves"]

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_in_flight: list[SaveHandle] = []
_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SaveHandle:
    """A save that may still be running. ``result()`` waits for it and raises its error."""

    def __init__(self, path: str, thread: threading.Thread | None = None):
        self.path, self._thread = path, thread
        self._error: BaseException | None = None
        self._reported = False

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> None:
        """Wait until the artifact is durable and in place.

        Raises:
            SaveError: the background write failed (the previous artifact is intact).
            TimeoutError: ``timeout`` seconds passed first.
        """
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"The save to '{self.path}' is still running after {timeout} s.")
        if self._error is not None and not self._reported:
            self._reported = True
            if isinstance(self._error, SaveError):
                raise self._error
            raise SaveError(f"The background save to '{self.path}' failed: {self._error}") from self._error

    def __repr__(self) -> str:
        return f"<SaveHandle {self.path!r} {'done' if self.done() else 'running'}>"


def wait_for_saves() -> None:
    """Block until every background save of this process is complete.

    Raises:
        SaveError: a background save failed; the message is the original one.
    """
    with _lock:
        pending = list(_in_flight)
        _in_flight.clear()
    for handle in pending:
        handle.result()


def start(path: str, work: Callable[[], None]) -> SaveHandle:
    """Run ``work`` (the whole write of the artifact at ``path``) in a background thread."""
    handle = SaveHandle(path)

    def run() -> None:
        try:
            work()
        except BaseException as error:  # kept for result(); logged so it is never silent
            handle._error = error
            logger.error("distsave: background save to '%s' failed: %s", path, error)

    handle._thread = threading.Thread(target=run, name=f"distsave-save:{Path(path).name}", daemon=False)
    with _lock:
        _in_flight.append(handle)
    handle._thread.start()
    return handle


def host_copies(owner: object, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host copy of every tensor, in buffers kept per ``owner`` and reused by the next save
    (page-locked for device tensors, so the copy runs at full PCIe speed and asynchronously)."""
    kept: dict[str, torch.Tensor] = _buffers.setdefault(owner, {})
    copies, devices = {}, set()
    for name, tensor in tensors.items():
        full = getattr(tensor, "full_tensor", None)
        tensor = (full() if callable(full) else tensor).detach()
        buffer = kept.get(name)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.device.type == "cuda")
            kept[name] = buffer
        buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
        if tensor.device.type == "cuda":
            devices.add(tensor.device)
        copies[name] = buffer
    for device in devices:
        torch.cuda.synchronize(device)
    for stale in set(kept) - set(tensors):
        del kept[stale]
    return copies
