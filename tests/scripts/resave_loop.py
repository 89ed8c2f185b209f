"""Re-save one path in a loop: version k has every weight equal to k and epoch k.

    resave_loop.py PATH STOP_FILE

Prints "ready" after the first save, stops when STOP_FILE exists (or after 100,000 saves).
Signatures are skipped to make each save fast: the race is in the files, not the programs.
"""

import sys
from pathlib import Path

import torch
from torch import nn

import distsave
from distsave.saving import model_format

path, stop = sys.argv[1], Path(sys.argv[2])
model_format.write_signatures = lambda *args, **kwargs: {}
model = distsave.Sequential([nn.Linear(64, 64), nn.Linear(64, 8)], input_spec=distsave.TensorSpec((None, 64)))
for version in range(1, 100_000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(version)
    model.epoch = version
    model.save(path)
    if version == 1:
        print("ready", flush=True)
    if stop.exists():
        break
print(version)
