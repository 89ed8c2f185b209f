"""Load each hostile artifact given; print JSON: per artifact the error (or "loaded"), and the
process's peak resident memory growth over the whole run (bytes)."""

import json
import resource
import sys

import torch
from torch import nn

import distsave


@distsave.register_serializable(package="Hostile")
class Wide(nn.Module):
    """A registered class whose width comes from the file."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, width))

    def forward(self, x):
        return x @ self.weight


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


distsave.load_model(sys.argv[1])  # a good artifact: warms every code path up
baseline = peak()
results = {}
for path in sys.argv[2:]:
    try:
        distsave.load_model(path)
        results[path] = "loaded"
    except distsave.ArtifactError as error:
        results[path] = f"ArtifactError: {error}"
    except Exception as error:  # reported, and the test fails on it
        results[path] = f"{type(error).__name__}: {error}"
print(json.dumps({"results": results, "growth": peak() - baseline}))
