"""Train from a DataLoader under MirroredStrategy(devices=["cpu"] * N); report per replica.

Each replica seeds torch with its rank before building the model, so the replicas start with
different weights unless distsave makes them agree. The report records which examples each
replica loaded, the evaluation before training, and the trained parameters.

    python dataloader_replicas.py REPORT_PREFIX REPLICAS
"""

import json
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import distsave


class Recorded(Dataset):
    """A map-style dataset that remembers which indices this process loaded."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=generator)
        self.y = (self.x[:, :4].sum(1) > 0).long()
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.loaded.append(int(i))
        return self.x[i], self.y[i]


prefix, replicas = sys.argv[1], int(sys.argv[2])
strategy = distsave.MirroredStrategy(devices=["cpu"] * replicas)
rank = strategy.replica_id
data = Recorded(200)
torch.manual_seed(rank)  # replicas build different weights: distsave must make them one model
with strategy.scope():
    model = distsave.Sequential([nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
before = model.evaluate(DataLoader(data, batch_size=50), verbose=0)
data.loaded.clear()
torch.manual_seed(0)
history = model.fit(DataLoader(data, batch_size=20, shuffle=True), epochs=2, verbose=0)
report = {"rank": rank, "before": before, "loaded": data.loaded, "history": history.history,
          "parameters": [p.detach().flatten().tolist() for p in model.parameters()]}
strategy.barrier()
with open(f"{prefix}.{rank}.json", "w") as f:
    json.dump(report, f)
