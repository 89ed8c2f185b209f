"""Two CPU replicas save a tiny model and exit: the cheapest run of the exit-after-save path."""

import sys

from torch import nn

import distsave

strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
with strategy.scope():
    model = distsave.Sequential([nn.Linear(4, 2)], input_spec=distsave.TensorSpec((None, 4)))
model.save(sys.argv[1])
