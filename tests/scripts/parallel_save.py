"""Two CPU replicas save one model together; replica 0 then saves the same model alone.

    parallel_save.py DIR

Chunks are made 4 KiB so that the files have many and both replicas write some. Writes
DIR/together (two writers), DIR/alone (one writer) and DIR/bytes.{rank}.json (bytes each
replica wrote).
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

import distsave
from distsave.saving import format as artifact_format
from distsave.saving import parallel_write, tensor_io

for module in (artifact_format, parallel_write, tensor_io):
    module.HASH_CHUNK_BYTES = 4096
written = 0
write_pieces = parallel_write.write_pieces


def counting_write_pieces(files):
    global written
    written += sum(p.length for _, pieces in files for p in pieces)
    return write_pieces(files)


parallel_write.write_pieces = counting_write_pieces
out = Path(sys.argv[1])
strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
with strategy.scope():
    torch.manual_seed(0)
    model = distsave.Sequential([nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)],
                                input_spec=distsave.TensorSpec((None, 8, 8)))
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
x, y = torch.randn(32, 8, 8), torch.randint(0, 10, (32,))
model.fit(x, y, batch_size=16, epochs=1, verbose=0)
model.save(out / "together", max_shard_size=10_000)
(out / f"bytes.{strategy.replica_id}.json").write_text(json.dumps(written))
strategy.barrier()
if strategy.is_chief:
    model.runtime.strategy = distsave.OneDeviceStrategy("cpu")
    model.save(out / "alone", max_shard_size=10_000)
