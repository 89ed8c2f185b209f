"""Which value a callback watches and which direction is better, as Keras' callbacks decide it."""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["Monitor"]

logger = logging.getLogger(__name__)


class Monitor:
    """A logged value to watch: ``improved(value, reference)`` with ``mode`` and ``min_delta``.

    ``mode="auto"`` means max for names with "acc" or "auc" in them, else min (losses).
    """

    def __init__(self, name: str, mode: str = "auto", min_delta: float = 0.0, *, owner: str):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{owner}: expected mode 'auto', 'min' or 'max'. Received: mode={mode!r}.")
        self.name, self.owner = name, owner
        self.mode = mode if mode != "auto" else ("max" if "acc" in name or "auc" in name else "min")
        self.min_delta = abs(min_delta)

    @property
    def worst(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    def improved(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def read(self, logs: dict[str, Any] | None) -> float | None:
        """The watched value from ``logs``, or None with a warning naming the keys there are."""
        logs = logs or {}
        if self.name not in logs:
            logger.warning("%s: the monitored value %r is not in the logs (available: %s); "
                           "skipping. Pass monitor= one of those, or validation_data= to fit for "
                           "val_ values.", self.owner, self.name, sorted(logs))
            return None
        return float(logs[self.name])
