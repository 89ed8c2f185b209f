"""Train the CNN for 8 steps of 64 examples under MirroredStrategy x2 (32 per replica) and
write the parameters; the test compares them with one replica taking all 64. Plain SGD, so
the comparison measures the gradients (Adam would magnify float noise in near-zero ones)."""

import sys

import torch
from safetensors.torch import save_file

import distsave
from distsave.demo import workflow_cnn

strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
train = distsave.datasets.load("mnist", split="train").take(512).map(
    lambda image, label: (image.float() / 255, label)).batch(64)
with strategy.scope():
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn())
    model.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
model.fit(train, epochs=1, verbose=0)
save_file({k: v.contiguous() for k, v in model.state_dict().items()},
          f"{sys.argv[1]}.{strategy.replica_id}.safetensors")
