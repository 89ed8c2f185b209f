"""Two CPU replicas save over an existing artifact; replica 1 is killed while it writes.

    replica_dies_mid_save.py DIR

Replica 0 prints the error its save raised as ``SAVE FAILED: <type>: <message>``.
"""

import os
import signal
import sys

import torch
from torch import nn

import distsave
from distsave.saving import format as artifact_format
from distsave.saving import parallel_write, tensor_io

for module in (artifact_format, parallel_write, tensor_io):
    module.HASH_CHUNK_BYTES = 4096  # several chunks, so replica 1 has some to write
strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
with strategy.scope():
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)],
                                input_spec=distsave.TensorSpec((None, 64)))
model.save(sys.argv[1])  # the artifact that must survive
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
if strategy.replica_id == 1:
    def die_while_writing(files):
        os.kill(os.getpid(), signal.SIGKILL)
    parallel_write.write_pieces = die_while_writing
try:
    model.save(sys.argv[1])
except distsave.SaveError as error:
    print(f"SAVE FAILED: {type(error).__name__}: {error}", flush=True)
    os._exit(3)
