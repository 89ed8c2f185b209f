"""Overwrite an artifact with model.save and SIGKILL this process at a chosen point.

    save_and_die.py TARGET POINT [--async]
"""

import os
import signal
import sys

import torch
from torch import nn

import distsave
from distsave.saving import atomic
from distsave.saving.manifest import ArtifactWriter

target, point, blocking = sys.argv[1], sys.argv[2], "--async" not in sys.argv


def dying_after(module, name):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapper)


modules = {"weights": (ArtifactWriter, "write_tensor_sets"), "manifest": (ArtifactWriter, "finish"),
           "fsync": (atomic, "fsync_tree"), "swap": (atomic, "_exchange")}
dying_after(*modules[point])
torch.manual_seed(1)
model = distsave.Sequential([nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)],
                            input_spec=distsave.TensorSpec((None, 1, 28, 28)))
distsave.wait_for_saves() if model.save(target, blocking=blocking) else None
