"""OneDeviceStrategy: one replica on one named device."""

from __future__ import annotations

import torch

from .base import Strategy
from .devices import parse_device

__all__ = ["OneDeviceStrategy"]


class OneDeviceStrategy(Strategy):
    """Place variables and computation on a single device.

    Args:
        device: ``"cpu"``, ``"cuda:0"``, or TF-style ``"/cpu:0"``, ``"/gpu:0"``.

    Raises:
        ValueError: the device string is malformed or the device does not exist.

    Example:
        >>> with OneDeviceStrategy("/cpu:0").scope():
        ...     pass
    """

    def __init__(self, device: str | torch.device):
        self.device = parse_device(device)

    def __repr__(self) -> str:
        return f"OneDeviceStrategy({str(self.device)!r})"
