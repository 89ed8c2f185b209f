"""Where distsave's random choices (each pass's shuffle seed) come from: torch's generator.

Where a run starts (`fit`, or a pass over a dataset outside `fit`) a private `random.Random` is
seeded with one draw from torch's default generator, as a ``DataLoader`` draws its shuffle seed;
the run's passes then take their seeds from it. So ``torch.manual_seed(s)`` (or
`distsave.utils.set_random_seed`) makes the data order repeat, and restoring torch's RNG state
mid-run (a resumed backup) does not disturb it. Its state is a Python ``random`` state, so a
backup stores it as JSON.
"""

from __future__ import annotations

import random

import torch

__all__ = ["draw_seed", "follow_torch", "get_state", "set_state"]

_generator = random.Random()
_seeded = False


def follow_torch() -> None:
    """Start a run's seed sequence from torch's default generator (one draw from it)."""
    global _seeded
    _generator.seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    _seeded = True


def draw_seed() -> int:
    """The seed of the next pass over a dataset (63 bits)."""
    if not _seeded:
        follow_torch()
    return _generator.getrandbits(63)


def get_state() -> tuple:
    """The generator's state (Python ``random`` format), for a backup."""
    return _generator.getstate()


def set_state(state: tuple) -> None:
    """Put back a state `get_state` gave; the sequence continues from there."""
    global _seeded
    _generator.setstate(state)
    _seeded = True
