"""Functions of the C library that Python's ``os`` module lacks (on Linux: ``fallocate``,
``sync_file_range``, ``renameat2``, ``prctl``), each looked up once, with errno kept for
``ctypes.get_errno``."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["function"]


def function(name: str, argtypes: list) -> Callable[..., int] | None:
    """The C library's function ``name`` taking ``argtypes``, or None where the C library has
    none (other systems than Linux): callers then do without it."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = argtypes
    return call
