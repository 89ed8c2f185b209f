"""Where distsave's random choices (each pass's shuffle seed) come from: torch's seed.

A pass's seed is drawn from a private `random.Random` that follows ``torch.initial_seed()``:
after ``torch.manual_seed(s)`` (or `distsave.utils.set_random_seed`) the next `fit` or pass
starts the same sequence of seeds, as a ``DataLoader``'s shuffle does. The generator is checked
against torch's seed only where a run starts (`follow_torch`), not per draw, so restoring
torch's RNG state mid-run (a resumed backup) does not restart the sequence. Its state is a
Python ``random`` state, so a backup stores it as JSON.
"""

from __future__ import annotations

import random

import torch

__all__ = ["draw_seed", "follow_torch", "get_state", "set_state"]

_generator = random.Random()
_followed: int | None = None


def follow_torch() -> None:
    """Restart the seed sequence if torch was seeded since the last run began."""
    global _followed
    seed = torch.initial_seed()
    if seed != _followed:
        _generator.seed(seed)
        _followed = seed


def draw_seed() -> int:
    """The seed of the next pass over a dataset (63 bits)."""
    if _followed is None:
        follow_torch()
    return _generator.getrandbits(63)


def get_state() -> tuple:
    """The generator's state (Python ``random`` format), for a backup."""
    return _generator.getstate()


def set_state(state: tuple) -> None:
    """Put back a state `get_state` gave; the sequence continues from there."""
    global _followed
    _generator.setstate(state)
    _followed = torch.initial_seed() if _followed is None else _followed
