"""Saves that finish in the background: ``model.save(path, blocking=False)``.

The caller's thread only copies the tensors (on the GPU itself when it has room, else into
page-locked host buffers reused from one save to the next) and returns; a background thread
writes, checksums, fsyncs and swaps the artifact into place. One save is in flight at a time: a
new save first waits for the previous one, and an error in the background is raised by the next
`save` or `wait_for_saves` with its original message. The interpreter waits for a save in flight
before it exits.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SaveError

__all__ = ["SaveHandle", "stable_copies", "start", "wait_for_saves"]

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


def stable_copies(owner: object, tensor_sets: dict[str, dict[str, torch.Tensor]]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], Callable[[], None]]:
    """A copy of every tensor that training cannot change, made in as little of the caller's time
    as possible, and a function the background thread calls to wait until the copies are done.

    Device tensors are copied on their device when it has room to spare (`_has_room`): a
    device-to-device copy of several GB takes milliseconds and is only queued, not waited for;
    the background thread streams the copies to the files as a blocking save would, and frees
    them when done. Otherwise, and for host tensors, into host buffers kept per ``owner`` and
    reused by the next save (page-locked for device tensors, so the copy runs at full PCIe speed).
    """
    flat = {(stem, name): _whole(t) for stem, tensors in tensor_sets.items() for name, t in tensors.items()}
    on_device: dict[torch.device, int] = {}
    for tensor in flat.values():
        if tensor.device.type == "cuda":
            on_device[tensor.device] = on_device.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
    in_place = {device for device, size in on_device.items() if _has_room(device, size)}
    kept: dict[tuple[str, str], torch.Tensor] = _buffers.setdefault(owner, {})
    copies: dict[str, dict[str, torch.Tensor]] = {stem: {} for stem in tensor_sets}
    for key, tensor in flat.items():
        if tensor.device in in_place:
            copy = tensor.clone(memory_format=torch.contiguous_format)
        else:
            copy = kept.get(key)
            if copy is None or copy.shape != tensor.shape or copy.dtype != tensor.dtype:
                copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                   pin_memory=tensor.device.type == "cuda")
                kept[key] = copy
            copy.copy_(tensor, non_blocking=tensor.device.type == "cuda")
        copies[key[0]][key[1]] = copy
    for stale in set(kept) - {key for key, t in flat.items() if t.device not in in_place}:
        del kept[stale]
    for device in set(on_device) - in_place:
        torch.cuda.synchronize(device)  # the host buffers are read as soon as the caller returns
    events = [torch.cuda.current_stream(device).record_event() for device in in_place]

    def wait() -> None:
        for event in events:
            event.synchronize()
    return copies, wait


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach()


# Part of a device's memory a background save leaves free: the training step that runs while
# the copies are written may need more than it holds between steps.
_DEVICE_HEADROOM = 0.1


def _has_room(device: torch.device, size: int) -> bool:
    """Whether ``size`` more bytes fit on ``device`` with `_DEVICE_HEADROOM` of it still free."""
    free, total = torch.cuda.mem_get_info(device)
    return size <= free - _DEVICE_HEADROOM * total
