"""strategy.run(loaded.signatures["serving_default"]) over MirroredStrategy x2; chief writes
the gathered outputs."""

import sys
from pathlib import Path

from safetensors.torch import save_file

import distsave

artifact, out = Path(sys.argv[1]), Path(sys.argv[2])
strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
with strategy.scope():
    loaded = distsave.saved_model.load(artifact)
test = distsave.datasets.load("mnist", split="test").take(500).map(
    lambda image, label: (image.float() / 255, label)).batch(128)
outputs, labels = [], []
for images, batch_labels in strategy.experimental_distribute_dataset(test):
    assert len(images) <= 64  # each replica sees its half of the global batch
    result = strategy.run(loaded.signatures["serving_default"], args=(images,))
    outputs.append(strategy.gather(result["output_0"]))
    labels.append(strategy.gather(batch_labels))
if strategy.is_chief:
    import torch

    save_file({"outputs": torch.cat(outputs), "labels": torch.cat(labels)}, out)
