"""Train the CNN under MirroredStrategy over every visible GPU (a plain script: it starts its own
replicas); each replica writes its parameters and which step ran.
Args: OUT_PREFIX OPTIMIZER [captured] (captured: compile(jit_compile=True), the opt-in captured step)."""

import json
import sys

import torch
from safetensors.torch import save_file

import distsave
from distsave.demo import workflow_cnn
from distsave.training import loop, steps

torch.backends.cudnn.allow_tf32 = False
prefix, optimizer, captured = sys.argv[1], sys.argv[2], sys.argv[3:] == ["captured"]
made = []
loop.make_train_step = lambda *a, **k: made.append(steps.make_train_step(*a, **k)) or made[-1]
strategy = distsave.MirroredStrategy()
with strategy.scope():
    torch.manual_seed(0)
    model = distsave.Sequential(workflow_cnn())
    model.compile(loss="sparse_categorical_crossentropy", optimizer=optimizer, metrics=["accuracy"],
                  **({"jit_compile": True} if captured else {}))
scale = lambda image, label: (image.float() / 255, label)  # noqa: E731
train = distsave.datasets.load("mnist", split="train").take(4096).map(scale).cache().batch(128)
history = model.fit(train, epochs=2, verbose=0)
model.save(f"{prefix}.artifact")
save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
          f"{prefix}.{strategy.replica_id}.safetensors")
with open(f"{prefix}.{strategy.replica_id}.json", "w") as f:
    json.dump({"replicas": strategy.num_replicas_in_sync, "backend": strategy._backend,
               "step": type(made[0]).__name__, "captured": getattr(made[0], "replays", 0) > 0,
               "loss": history.history["loss"]}, f)
