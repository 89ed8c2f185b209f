"""Save a tiny model to one path while other processes do the same.

Saves use distsave.saved_model.save without signatures (weights + manifest, through the same
atomic write as model.save): exporting a signature costs ~1 s a save on a busy 2-core machine
and tests nothing about concurrent writes.

    concurrent_save.py loop TARGET VALUE COUNT
        print "ready", wait for a line on stdin, then save COUNT times; the i-th model's weights
        are all VALUE + i (so the last one holds VALUE + COUNT - 1).
    concurrent_save.py hold TARGET VALUE
        save once, but print "staging" and wait for a line on stdin once the staging folder is
        complete (just before its fsync and swap).
    concurrent_save.py hold-swap TARGET VALUE
        save once with the two-rename swap of systems without renameat2's exchange, but print
        "swapping" and wait for a line on stdin between the two renames (target moved aside).

Either way the last line printed is a JSON report: {"errors": ["Type: message", ...]}.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import distsave
from distsave.saving import atomic

mode, target, value = sys.argv[1], sys.argv[2], float(sys.argv[3])


def model_of(weight: float) -> distsave.Sequential:
    model = distsave.Sequential([nn.Linear(4, 2)])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(weight)
    return model


def wait_for_go(signal: str) -> None:
    print(signal, flush=True)
    sys.stdin.readline()


def paused_before_fsync():
    original = atomic.fsync_tree

    def wrapper(root):
        wait_for_go("staging")
        return original(root)

    atomic.fsync_tree = wrapper


def paused_between_renames():
    original = os.rename

    def wrapper(source, destination):
        original(source, destination)
        if Path(source) == Path(target).absolute():
            wait_for_go("swapping")

    atomic._exchange = lambda a, b: False
    atomic.os.rename = wrapper


errors = []
if mode == "loop":
    models = [model_of(value + i) for i in range(int(sys.argv[4]))]
    wait_for_go("ready")
else:
    models = [model_of(value)]
    {"hold": paused_before_fsync, "hold-swap": paused_between_renames}[mode]()
for model in models:
    try:
        distsave.saved_model.save(model, target)
    except Exception as error:  # every failure is reported to the test, which judges it
        errors.append(f"{type(error).__name__}: {error}")
print(json.dumps({"errors": errors}), flush=True)
