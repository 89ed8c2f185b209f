"""Save checkpoints FIRST, FIRST+2, ... below LAST into DIR with a CheckpointManager(max_to_keep=3).

    save_checkpoints.py DIR FIRST LAST

Every weight of checkpoint k equals k, so a reader can tell whose checkpoint it loaded.
"""

import sys

import torch
from torch import nn

import distsave
from distsave.saving import model_format
from distsave.saving.signatures import ExportedSignatures


model_format._export_serving = lambda *args: ExportedSignatures({})  # saves skip the serving program
directory, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
manager = distsave.CheckpointManager(directory, max_to_keep=3)
model = distsave.Sequential([nn.Linear(64, 64)], input_spec=distsave.TensorSpec((None, 64)))
for step in range(first, last, 2):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    model.step = step
    manager.save(model, metrics={"loss": 1.0 / (step + 1)})
