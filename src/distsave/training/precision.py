"""Training precision: full float32, or mixed bf16 / fp16 under autocast (Lightning's names).

``"bf16-mixed"`` and ``"16-mixed"`` keep float32 parameters and optimizer state and run the
forward pass and loss under ``torch.autocast``; ``"16-mixed"`` scales the loss so small float16
gradients do not vanish. The setting is part of the compile config, so a loaded model trains
as it did.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_ALIASES = {"float32": "32", "32-true": "32", "mixed_bfloat16": "bf16-mixed",
            "mixed_float16": "16-mixed"}  # Keras policy names


@dataclass(frozen=True)
class Precision:
    """One of ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (Keras' ``"mixed_bfloat16"`` and
    ``"mixed_float16"`` are accepted and stored under these names)."""

    name: str = "32"

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.name, self.name)
        if name not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.name!r}. Expected one of {sorted(PRECISIONS)} "
                             f"(or a Keras policy name: {sorted(_ALIASES)}).")
        object.__setattr__(self, "name", name)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full precision."""
        return PRECISIONS[self.name]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Where forward and loss run: autocast to the mixed dtype, or nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 (None otherwise)."""
        if self.dtype is not torch.float16:
            return None
        return torch.amp.GradScaler(device.type)
