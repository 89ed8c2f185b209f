"""Small helpers with Keras' names."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["set_random_seed"]


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (every device) at once, as
    ``keras.utils.set_random_seed`` does. distsave's own choices (shuffle seeds) follow torch's
    seed, so after this call a script repeats its run bit for bit on the same machine.

    Example:
        >>> distsave.utils.set_random_seed(0)
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"Expected an integer seed. Received: {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
