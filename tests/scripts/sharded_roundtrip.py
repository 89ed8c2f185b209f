"""A model trained and saved under ShardedStrategy x2, loaded under other strategies and sizes.

    sharded_roundtrip.py train DIR       Sharded x2: fit 1 epoch, save DIR/model, write the
                                         predictions, then fit 1 more epoch (the reference losses)
    sharded_roundtrip.py sharded N DIR   Sharded xN: load, predict; with N=3 also fit 1 epoch
    sharded_roundtrip.py mirrored DIR    Mirrored x2: load, predict
    sharded_roundtrip.py plain DIR       no strategy, OneDevice("cpu") and saved_model.load
    sharded_roundtrip.py bf16 DIR        Sharded x2, bf16 mixed precision: fit, save, load back
    sharded_roundtrip.py refused DIR     Sharded x2: load DIR/damaged and save(blocking=False);
                                         each replica prints what was refused

Predictions go to DIR/pred.<name>.safetensors and epoch losses to DIR/losses.<name>.json (replica 0).
The first layer has 10 output rows: over 3 replicas its rows split 4, 4, 2.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

import distsave

mode, rest = sys.argv[1], sys.argv[2:]
out = Path(rest[-1])
generator = torch.Generator().manual_seed(0)
features = torch.randn(120, 12, generator=generator)
labels = torch.randint(0, 7, (120,), generator=generator)
probe = torch.randn(9, 12, generator=generator)


def dataset():
    return distsave.data.Dataset.from_tensor_slices((features, labels)).shuffle(120, seed=5).batch(24)


def fit_one_epoch(model, name):
    """One more epoch; its loss (over every replica's examples) and the predictions after it."""
    history = model.fit(dataset(), epochs=1, verbose=0)
    predictions = model.predict(probe)
    if model.distribute_strategy.is_chief:
        (out / f"losses.{name}.json").write_text(json.dumps(history.history["loss"]))
        write_predictions(f"after.{name}", predictions)


def write_predictions(name, outputs):
    if not isinstance(outputs, dict):
        outputs = {"output": outputs}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in outputs.items()}, out / f"pred.{name}.safetensors")


def full_state(model):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


if mode == "train":
    strategy = distsave.ShardedStrategy(devices=["cpu", "cpu"])
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Sequential([nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7)])
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(dataset(), epochs=1, verbose=0)
    model.save(out / "model")
    predictions = model.predict(probe)
    if strategy.is_chief:
        write_predictions("saved", predictions)
    fit_one_epoch(model, "uninterrupted")
elif mode == "sharded":
    strategy = distsave.ShardedStrategy(devices=["cpu"] * int(rest[0]))
    with strategy.scope():
        model = distsave.load_model(out / "model")
    assert isinstance(model.layers[0].weight, DTensor), "not sharded after load"
    predictions = model.predict(probe)
    if strategy.is_chief:
        write_predictions(f"sharded{rest[0]}", predictions)
    if rest[0] == "3":
        fit_one_epoch(model, "resumed_sharded3")
elif mode == "mirrored":
    strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
    with strategy.scope():
        model = distsave.load_model(out / "model")
    predictions = model.predict(probe)
    if strategy.is_chief:
        write_predictions("mirrored2", predictions)
elif mode == "plain":
    write_predictions("no_strategy", distsave.load_model(out / "model").predict(probe))
    with distsave.OneDeviceStrategy("cpu").scope():
        write_predictions("one_device", distsave.load_model(out / "model").predict(probe))
    loaded = distsave.saved_model.load(out / "model")
    write_predictions("saved_model", loaded.signatures["serving_default"](probe))
elif mode == "bf16":
    strategy = distsave.ShardedStrategy(devices=["cpu", "cpu"], mixed_precision="bf16-mixed")
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Sequential([nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7)])
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    model.fit(dataset(), epochs=1, verbose=0)
    model.save(out / "bf16")
    with strategy.scope():
        loaded = distsave.load_model(out / "bf16")
    before, after = full_state(model), full_state(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    saved, restored = model.predict(probe), loaded.predict(probe)
    if strategy.is_chief:
        write_predictions("bf16_saved", saved)
        write_predictions("bf16_loaded", restored)
elif mode == "refused":
    strategy = distsave.ShardedStrategy(devices=["cpu", "cpu"])
    with strategy.scope():
        try:
            distsave.load_model(out / "damaged")
        except distsave.ArtifactError as error:
            print(f"replica {strategy.replica_id} LOAD REFUSED: {error}", flush=True)
        model = distsave.load_model(out / "model")
    try:
        model.save(out / "async", blocking=False)
    except distsave.SaveError as error:
        print(f"replica {strategy.replica_id} ASYNC REFUSED: {error}", flush=True)
    model.save(out / "blocking")  # the replicas still work together after both refusals
else:
    raise SystemExit(f"unknown mode {mode!r}")
