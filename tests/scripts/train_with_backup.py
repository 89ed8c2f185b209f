"""Train a tiny model for 3 epochs with BackupAndRestore; optionally die at a chosen point.

    train_with_backup.py OUT STRATEGY [KILL]

STRATEGY is "one" (OneDeviceStrategy) or "mirrored" (two CPU replicas). KILL is
"WHERE:STEP": the chief SIGKILLs itself at global step STEP, "step" right after that step's
callbacks, or inside that step's backup: "weights" (model tensors written), "state" (training
state written), "swap" (an artifact renamed into place), "index" (index renamed into place); or
"sigterm:STEP" sends SIGTERM to every replica after that step (each replica signals itself).
A run that finishes saves the model to OUT/final and writes OUT/done.
"""

import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import distsave
from distsave.saving import atomic, checkpoint_manager, model_format
from distsave.saving.manifest import ArtifactWriter
from distsave.saving.signatures import ExportedSignatures

out, kind = Path(sys.argv[1]), sys.argv[2]
where, _, at = (sys.argv[3] if len(sys.argv) > 3 else "none:-1").partition(":")
kill_step = int(at)


model_format._export_serving = lambda *args: ExportedSignatures({})  # the race is in the files: cheap saves
strategy = (distsave.MirroredStrategy(devices=["cpu", "cpu"]) if kind == "mirrored"
            else distsave.OneDeviceStrategy("cpu"))
torch.set_num_threads(1)
current = {"step": -1}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def dying_after(owner, name, when):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if strategy.is_chief and current["step"] == kill_step and when(args):
            die()
        return result

    setattr(owner, name, wrapper)


dying_after(ArtifactWriter, "write_tensor_sets", lambda args: where == "weights" and "model" in args[1]
            or where == "state" and "training_state" in args[1])
dying_after(atomic, "_swap_into_place", lambda args: where == "swap" and "backup" in str(args[1]))
dying_after(checkpoint_manager, "_replace_file", lambda args: where == "index")


class Tracker(distsave.Callback):
    def on_train_batch_end(self, batch, logs=None):
        current["step"] = self.model.step


class Killer(distsave.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.step == kill_step:
            if where == "step" and strategy.is_chief:
                die()
            if where == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)


random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
generator = torch.Generator().manual_seed(1)
x = torch.randn(96, 8, generator=generator)
y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
data = distsave.data.Dataset.from_tensor_slices((x, y))
if os.environ.get("CACHE"):
    data = data.map(lambda a, b: (a * 2, b)).cache()
data = data.shuffle(96).batch(16)
with strategy.scope():
    model = distsave.Sequential([nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)],
                                input_spec=distsave.TensorSpec((None, 8)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
backup = distsave.callbacks.BackupAndRestore(out / "backup", save_freq=2, delete_checkpoint=False)
# Killer runs after the backup of its step, so "step" kills land between a backup and the next step.
history = model.fit(data, epochs=3, callbacks=[Tracker(), backup, Killer()], verbose=0)
model.save(out / "final")
if strategy.is_chief:
    (out / "done").write_text(repr(history.history))
