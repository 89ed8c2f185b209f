"""Device strings: PyTorch's (``"cuda:0"``) and TensorFlow's (``"/gpu:0"``), checked to exist."""

from __future__ import annotations

import re

import torch

__all__ = ["parse_device"]

_TF_STYLE = re.compile(r"^/?(?:job:[^/]+/)?(?:replica:\d+/)?(?:task:\d+/)?(?:device:)?(cpu|gpu|cuda)(?::(\d+))?$",
                       re.IGNORECASE)


def parse_device(spec: str | torch.device, *, must_exist: bool = True) -> torch.device:
    """Turn ``"cpu"``, ``"cuda:1"``, ``"/gpu:0"`` or ``"/cpu:0"`` into a device that exists here."""
    if isinstance(spec, torch.device):
        device = spec
    else:
        match = _TF_STYLE.match(spec.strip())
        if match is None:
            raise ValueError(
                f"Expected a device such as 'cpu', 'cuda:0', '/cpu:0' or '/gpu:0'. Received: {spec!r}."
            )
        kind, index = match.group(1).lower(), match.group(2)
        if kind == "cpu":
            device = torch.device("cpu")
        else:
            device = torch.device("cuda", int(index or 0))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device type {device.type!r} in {spec!r}; use 'cpu' or 'cuda:N'.")
    if device.type == "cuda" and must_exist:
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise ValueError(
                f"Device {spec!r} does not exist: this machine has {count} CUDA device(s). "
                "Use 'cpu' or one of " + str([f"cuda:{i}" for i in range(count)]) + "."
            )
        device = torch.device("cuda", index)
    return device
