"""Train with a shuffled pipeline, a shuffled DataLoader and dropout after one seeding call;
print a digest of the weights.  seeded_fit.py SEED torch|utils"""

import hashlib
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distsave

seed, how = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed) if how == "torch" else distsave.utils.set_random_seed(seed)
x = torch.randn(128, 6)
y = (x[:, 0] > 0).long()
model = distsave.Sequential([nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(distsave.data.Dataset.from_tensor_slices((x, y)).shuffle(50).batch(16), epochs=2, verbose=0)
model.fit(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), epochs=1, verbose=0)
model.fit(x.numpy(), y.numpy(), batch_size=16, epochs=1, verbose=0)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
print(digest.hexdigest())
