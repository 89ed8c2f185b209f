"""ModelCheckpoint(save_best_only=True, monitor="val_accuracy") under two CPU replicas.

    checkpoint_best.py OUT

Writes OUT/report.{rank}.json: how many artifacts this replica wrote, and the history.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

import distsave
from distsave.saving.manifest import ArtifactWriter

out = Path(sys.argv[1])
written = []
finish = ArtifactWriter.finish
ArtifactWriter.finish = lambda self, content: written.append(1) or finish(self, content)
strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
torch.manual_seed(0)
x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
y = (x[:, 0] > 0).long()
data = distsave.data.Dataset.from_tensor_slices((x, y)).batch(16)
with strategy.scope():
    model = distsave.Sequential([nn.Linear(8, 2)], input_spec=distsave.TensorSpec((None, 8)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
checkpoint = distsave.callbacks.ModelCheckpoint(out / "best-{epoch:02d}", monitor="val_accuracy",
                                                save_best_only=True)
history = model.fit(data, epochs=4, validation_data=data, callbacks=[checkpoint], verbose=0)
(out / f"report.{strategy.replica_id}.json").write_text(json.dumps({"written": len(written), **history.history}))
