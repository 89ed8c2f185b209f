"""`TerminateOnNaN`: stop ``fit`` as soon as the loss is NaN or infinite."""

from __future__ import annotations

import logging
import math

from ..training.callbacks import Callback

__all__ = ["TerminateOnNaN"]

logger = logging.getLogger(__name__)


class TerminateOnNaN(Callback):
    """Stop training after a step whose running loss is NaN or infinite.

    It reads the loss after every step (one device sync per step). Under several replicas the
    replica that sees it stops them all at the same step.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            logger.warning("TerminateOnNaN: the loss is %s after batch %d; stopping.", float(loss), batch)
            self.model.stop_training = True
