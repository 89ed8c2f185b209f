"""One torchrun worker of a multi-node run (MultiWorkerMirroredStrategy, gloo on CPU).
Args: OUT_PREFIX MODE; MODE "train" trains 1 epoch and saves, "forever" trains until killed."""

import datetime
import json
import sys

import torch
from safetensors.torch import save_file

import distsave
from distsave.demo import workflow_cnn

prefix, mode = sys.argv[1], sys.argv[2]
strategy = distsave.MultiWorkerMirroredStrategy(timeout=datetime.timedelta(seconds=30))
with strategy.scope():
    torch.manual_seed(strategy.replica_id)  # different on each node: the strategy must sync them
    model = distsave.Sequential(workflow_cnn())
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd", metrics=["accuracy"])
scale = lambda image, label: (image.float() / 255, label)  # noqa: E731
data = distsave.datasets.load("mnist", split="train").take(512).map(scale).batch(64)
if mode == "forever":
    print("training", flush=True)
    model.fit(data, epochs=100000, verbose=0)
model.fit(data, epochs=1, verbose=0)
model.save(f"{prefix}.artifact")
save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
          f"{prefix}.{strategy.replica_id}.safetensors")
with open(f"{prefix}.{strategy.replica_id}.json", "w") as f:
    json.dump({"replicas": strategy.num_replicas_in_sync}, f)
