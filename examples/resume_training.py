"""Kill-and-resume: train with BackupAndRestore, get killed, run again, finish as if never stopped.

    python examples/resume_training.py            # trains; kill it (Ctrl-C, kill -9, SIGTERM) and rerun
    python examples/resume_training.py --demo     # kills itself twice on the way, then checks the result

Two CPU replicas (gloo). A restarted run continues from the last backup: same epoch, same batch
within it, same optimizer state, RNGs and data order, so the final weights are bitwise those
of an uninterrupted run. SIGTERM (what schedulers send before they kill) stops training after
the current step with a fresh backup and exit code 143.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import distsave

WORK = Path("resume_demo")


def train(die_at_step: int | None = None) -> None:
    strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
    random.seed(0)  # fit draws each epoch's shuffle seed from Python's RNG: seed it for a comparable run
    torch.manual_seed(0)
    mnist, _ = distsave.datasets.load("mnist", with_info=True, as_supervised=True)
    train_data = (mnist["train"].take(2048).map(lambda x, y: (x.float() / 255, y))
                  .cache().shuffle(2048).batch(64))
    with strategy.scope():
        model = distsave.Sequential([nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(64, 10)])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class DieAt(distsave.Callback):  # stands in for a preempted machine
        def on_train_batch_end(self, batch, logs=None):
            if self.model.step == die_at_step and strategy.is_chief:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [distsave.callbacks.BackupAndRestore(WORK / "backup", save_freq=10),
                 distsave.callbacks.ModelCheckpoint(WORK / "epoch-{epoch:02d}"), DieAt()]
    model.fit(train_data, epochs=3, callbacks=callbacks, verbose=0)
    model.save(WORK / "final")


def demo() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    for die_at in (25, 61):
        code = subprocess.run([sys.executable, __file__, "--die-at", str(die_at)]).returncode
        print(f"run killed at step {die_at}: exit code {code}")
    subprocess.run([sys.executable, __file__], check=True)
    resumed = distsave.load_model(WORK / "final")
    os.rename(WORK / "final", WORK / "final-resumed")
    subprocess.run([sys.executable, __file__], check=True)  # uninterrupted, for comparison
    straight = distsave.load_model(WORK / "final")
    same = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    print(f"resumed after two kills == uninterrupted run, bitwise: {same}")


if __name__ == "__main__":
    if "--demo" in sys.argv and "RANK" not in os.environ:
        demo()
    else:
        train(int(sys.argv[sys.argv.index("--die-at") + 1]) if "--die-at" in sys.argv else None)
