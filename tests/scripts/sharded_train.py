"""Train one small model under ShardedStrategy xN and under MirroredStrategy xN (same process
group, same data, same shuffling) and write a report per replica for the tests to compare.

Usage: sharded_train.py REPLICAS REPORT_PREFIX [--extras] [--cuda]. ``--extras`` also trains
under bf16 mixed precision and shards a model too big for this machine (built on ``meta``);
``--cuda`` puts replica i on cuda:i (NCCL) instead of a CPU (gloo).
Each replica seeds its own initial weights differently: equal results mean replica 0's weights
reached every replica.
"""

import json
import random
import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import distsave

replicas, prefix, flags = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
devices = [f"cuda:{i}" for i in range(replicas)] if "--cuda" in flags else ["cpu"] * replicas
sharded = distsave.ShardedStrategy(devices=devices)
mirrored = distsave.MirroredStrategy(devices=devices)  # joins the same processes
rank = sharded.replica_id

generator = torch.Generator().manual_seed(0)
features = torch.randn(161, 8, generator=generator)  # last global batch: 1 example, so
labels = torch.randint(0, 10, (161,), generator=generator)  # some replicas get none


def dataset():
    """A new pipeline each time: a shuffled dataset reshuffles on every pass, as in tf.data."""
    return distsave.data.Dataset.from_tensor_slices((features, labels)).shuffle(161).batch(32)


class BatchLosses(distsave.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def network():
    return [nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10)]


def build(strategy, **compile_args):
    torch.manual_seed(rank)  # a different start on every replica
    with strategy.scope():
        model = distsave.Sequential(network())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam",
                      metrics=["accuracy"], **compile_args)
    return model


def full_state(model):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu", copy=True)
            for k, v in model.state_dict().items()}


def train(strategy, epochs=1):
    model = build(strategy)
    initial = full_state(model)
    random.seed(0)  # the chief draws the shuffling seed from here
    batches = BatchLosses()
    history = model.fit(dataset(), epochs=epochs, verbose=0, callbacks=[batches])
    return model, initial, batches.losses, history.history["loss"]


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


torch.manual_seed(0)
chief_initial = nn.Sequential(*network()).state_dict()  # what replica 0 starts from
m_model, m_initial, m_losses, _ = train(mirrored)
s_model, s_initial, s_losses, _ = train(sharded)
s_state, m_state = full_state(s_model), full_state(m_model)
params = dict(s_model.named_parameters())
adam = s_model.optimizer.state[params["2.weight"]]
eval_x = features[:37]
random.seed(1)
s_eval = s_model.evaluate(dataset(), verbose=0, return_dict=True)
random.seed(1)
m_eval = m_model.evaluate(dataset(), verbose=0, return_dict=True)
local_x = sharded.shard(eval_x)
ran = sharded.run(s_model, args=(local_x,))
with torch.no_grad():
    expected = m_model(eval_x.to(mirrored.device))

report = {
    "rank": rank,
    "initial_diff": max_diff(s_initial, chief_initial),
    "trained_diff": max_diff(s_state, m_state),
    "moved": min(float((s_state[k] - s_initial[k]).abs().max()) for k in s_state),
    "sharded_losses": s_losses, "mirrored_losses": m_losses,
    "placements": sorted({str(p.placements) for p in s_model.parameters()}),
    "all_dtensors": all(isinstance(p, DTensor) for p in s_model.parameters()),
    "optimizer_holds_model_params": all(any(p is q for q in s_model.parameters())
                                        for g in s_model.optimizer.param_groups for p in g["params"]),
    "local_rows": {n: p.to_local().shape[0] for n, p in params.items()},
    "global_shapes": {n: list(p.shape) for n, p in params.items()},
    "adam_state": {k: [type(v).__name__, list((v.to_local() if isinstance(v, DTensor) else v).shape)]
                   for k, v in adam.items()},
    "evaluate": [s_eval, m_eval],
    "predict_diff": float((s_model.predict(eval_x, batch_size=8) - expected).abs().max()),
    "predict_rows": len(s_model.predict(eval_x, batch_size=8)),
    "run_gather_diff": float((sharded.gather(ran) - expected).abs().max()),
    "reduce": sharded.reduce("SUM", torch.tensor([rank + 1.0])).tolist(),
    "parameter_devices": sorted({str(p.device) for p in s_model.parameters()}),
    "describe": sharded.describe(),
}

if "--extras" in flags:
    bf16 = distsave.ShardedStrategy(devices=devices, mixed_precision="bf16-mixed")
    b_model, b_initial, b_losses, b_history = train(bf16, epochs=3)
    compute = []
    b_model.layers[0].register_forward_hook(lambda layer, args, out: compute.append(str(out.dtype)))
    report["bf16"] = {
        "epoch_losses": b_history,
        "input_spec": b_model.input_spec[0].dtype,
        "param_dtypes": sorted({str(p.dtype) for p in b_model.parameters()}),
        "predict_dtype": str(b_model.predict(eval_x).dtype),
        "moved": min(float((v - b_initial[k]).abs().max()) for k, v in full_state(b_model).items()),
    }
    report["bf16"]["compute_dtypes"] = sorted(set(compute))
    with torch.device("meta"):
        huge = distsave.Model(nn.Sequential(nn.Linear(2**19, 2**19), nn.Linear(2**19, 2)))  # 1 TiB
    try:
        sharded.apply_sharding(huge)
        report["too_big"] = None
    except MemoryError as error:
        report["too_big"] = str(error)
    report["too_big_still_on_meta"] = all(p.is_meta for p in huge.parameters())


def host_memory(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


if "--cuda" in flags:  # built on the host, sharded: each GPU only ever holds its rows
    torch.cuda.reset_peak_memory_stats(sharded.device)
    held = torch.cuda.memory_allocated(sharded.device)  # what the runs above still hold
    with sharded.scope():
        big = distsave.Model(nn.Linear(4096, 4096))
        big.compile(optimizer="adam", loss="mse")
    report["peak_fraction"] = (torch.cuda.max_memory_allocated(sharded.device) - held) / (4096 * 4097 * 4)
    report["backend"] = torch.distributed.get_backend(sharded._group)
else:  # the shards are host memory: compiling a host model adds only its rows
    layer = nn.Linear(8192, 4096)  # 128 MiB on the host, every page written by its initialisation
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak resident memory starts again from now
    resident = host_memory("VmRSS")
    with sharded.scope():
        big = distsave.Model(layer)
        big.compile(optimizer="adam", loss="mse")
    report["host_peak_fraction"] = (host_memory("VmHWM") - resident) / (8192 * 4097 * 4)

sharded.barrier()
with open(f"{prefix}.{rank}.json", "w") as f:
    json.dump(report, f)
